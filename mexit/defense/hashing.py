"""Input hashers: the per-input identity that TimeGuard's delay is keyed on.

The delay of an input must not change when it is queried again, so its seed comes from a hash of the
input, and the choice of hash decides what counts as "the same input":

* :class:`PerceptualHasher` (images): near-duplicates (re-encoded, ±1 grey level) usually share a hash and
  so share a delay, which stops an attacker from averaging the delay away over slightly perturbed
  copies. It is not a guarantee: a perturbation that moves a DCT coefficient across the median flips a
  bit and gives a fresh delay.
* :class:`DCTHasher` (images, the default): the same pHash computed on the float array with two small
  matrix products, ~10x cheaper than the PIL round trip on the request path, equally robust (measured).
* :class:`ExactHasher` (tabular rows): SHA-512 of a canonical byte encoding; any change gives a fresh,
  independent delay, and equal values give equal hashes whatever dtype or memory layout they came in.

Both are pure functions of the values, so the same input hashes the same in every process.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Literal, Protocol, runtime_checkable

import imagehash
import numpy as np
from PIL import Image
from scipy import fft

from mexit.errors import ConfigError, InputError

PerceptualKind = Literal["phash", "ahash"]
_PERCEPTUAL = {"phash": imagehash.phash, "ahash": imagehash.average_hash}


@runtime_checkable
class InputHasher(Protocol):
    """Maps one input sample (no batch axis) to a digest; ``name`` separates hash families in the KDF."""

    @property
    def name(self) -> str: ...

    def digest(self, x: np.ndarray) -> bytes: ...


def _one_image(x: np.ndarray) -> np.ndarray:
    """One image as (C, H, W) with C in (1, 3) ((H, W) gets a channel axis), finite; InputError otherwise."""
    arr = np.asarray(x)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] not in (1, 3):
        raise InputError(f"perceptual hashing expects one image of shape (C, H, W) with C in (1, 3) "
                         f"or (H, W); got shape {tuple(np.shape(x))}")
    _check_finite(arr)
    return arr


def _check_finite(x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        raise InputError("cannot hash an input with NaN or infinite values; expected finite numbers")


class PerceptualHasher:
    """A perceptual hash (imagehash pHash or aHash) of one image given as float ``(C, H, W)``.

    ``value_range`` is the pixel range of the model input (``(0, 1)`` for mexit bundles, which
    normalise inside the graph); pixels are mapped to uint8, channels moved last by a transpose (the
    reference reshaped CHW memory as HWC, scrambling the image), and 1 or 3 channels become an L or
    RGB PIL image. 2-D ``(H, W)`` inputs are taken as grey.
    """

    def __init__(self, kind: PerceptualKind = "phash", hash_size: int = 8,
                 value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        if kind not in _PERCEPTUAL:
            raise ConfigError(f"unknown perceptual hash {kind!r}; expected one of {sorted(_PERCEPTUAL)}")
        if hash_size < 2:
            raise ConfigError(f"hash_size must be >= 2, got {hash_size}")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ConfigError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.kind = kind
        self.hash_size = int(hash_size)
        self.value_range = (lo, hi)
        self._fn = _PERCEPTUAL[kind]

    @property
    def name(self) -> str:
        return f"{self.kind}{self.hash_size}"

    def to_image(self, x: np.ndarray) -> Image.Image:
        """The PIL image the hash is computed on (exposed so that tests and users can inspect it)."""
        arr = _one_image(x)
        lo, hi = self.value_range
        scaled = np.array(arr, dtype=np.float32)  # a private copy, scaled in place (this is on the request path)
        if lo != 0.0:
            scaled -= np.float32(lo)
        scaled *= np.float32(255.0 / (hi - lo))
        np.rint(scaled, out=scaled)
        u8 = np.clip(scaled, 0, 255, out=scaled).astype(np.uint8)
        hwc = np.ascontiguousarray(u8.transpose(1, 2, 0))
        if hwc.shape[2] == 1:
            return Image.fromarray(hwc[:, :, 0])
        return Image.fromarray(hwc)

    def digest(self, x: np.ndarray) -> bytes:
        bits = self._fn(self.to_image(x), hash_size=self.hash_size).hash
        return np.packbits(np.asarray(bits, dtype=bool).ravel()).tobytes()

    def __repr__(self) -> str:
        return f"PerceptualHasher(kind={self.kind!r}, hash_size={self.hash_size}, value_range={self.value_range})"


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) box-filter resampling: output cell i averages the input span [i, i+1)·n_in/n_out."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


class DCTHasher:
    """pHash computed on the float array with two small matrix products: the hot-path image hasher.

    Same recipe as imagehash's pHash (luma ``0.299 R + 0.587 G + 0.114 B``, a ``4·hash_size`` square
    image, 2-D DCT-II, the top-left ``hash_size²`` coefficients compared with their median) without the
    PIL round trip: the box-filter resize and the low-frequency DCT rows are folded into one
    ``(hash_size, H)`` and one ``(hash_size, W)`` matrix per input shape (cached), so a 3×32×32 image
    costs a few µs instead of imagehash's 200–300 µs. It skips the uint8 quantisation, so a pixel change
    below one grey level can still flip a bit whose coefficient sits at the median — measured in
    ``benchmarks/defense_hashing.py`` against imagehash (share of CIFAR-10 images keeping their hash
    under ±1/255 noise). Inputs are ``(C, H, W)`` with C in (1, 3) or ``(H, W)``, values in ``value_range``.
    """

    def __init__(self, hash_size: int = 8, value_range: tuple[float, float] = (0.0, 1.0)) -> None:
        if hash_size < 2:
            raise ConfigError(f"hash_size must be >= 2, got {hash_size}")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ConfigError(f"value_range must be (low, high) with high > low, got {value_range}")
        self.hash_size = int(hash_size)
        self.value_range = (lo, hi)
        side = 4 * self.hash_size
        self._dct = fft.dct(np.eye(side), type=2, axis=0)[: self.hash_size]  # (hash_size, side), unnormalised
        self._proj: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._luma = np.array([0.299, 0.587, 0.114], dtype=np.float64)

    @property
    def name(self) -> str:
        return f"dctphash{self.hash_size}"

    def _projections(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        proj = self._proj.get((h, w))
        if proj is None:
            side = 4 * self.hash_size
            proj = (self._dct @ _area_matrix(h, side), self._dct @ _area_matrix(w, side))
            self._proj[(h, w)] = proj
        return proj

    def bits(self, x: np.ndarray) -> np.ndarray:
        """The ``hash_size²`` hash bits (bool), exposed for tests and robustness measurements."""
        arr = _one_image(x)
        lo, hi = self.value_range
        grey = arr[0] if arr.shape[0] == 1 else np.tensordot(self._luma, arr, axes=1)
        grey = (grey - lo) * (255.0 / (hi - lo))  # the affine map keeps the median comparison; kept for clarity
        rows, cols = self._projections(arr.shape[1], arr.shape[2])
        low = rows @ grey @ cols.T
        return low > np.median(low)

    def digest(self, x: np.ndarray) -> bytes:
        return np.packbits(self.bits(x).ravel()).tobytes()

    def __repr__(self) -> str:
        return f"DCTHasher(hash_size={self.hash_size}, value_range={self.value_range})"


class ExactHasher:
    """SHA-512 of a canonical encoding: the shape (uint64 LE) then float32 LE C-order values.

    Values are cast to float32 (what the runtime feeds the model) and ``-0.0`` is folded into ``0.0``,
    so equal inputs hash equally regardless of dtype, byte order or memory layout.
    """

    name = "sha512"

    def digest(self, x: np.ndarray) -> bytes:
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            raise InputError(f"exact hashing expects numeric values; got dtype {arr.dtype}")
        _check_finite(arr)
        # Adding +0.0 folds -0.0 into 0.0 and yields a fresh C-contiguous array (no copy for "<f4" on LE).
        values = (np.asarray(arr, dtype=np.float32) + np.float32(0.0)).astype("<f4", copy=False)
        digest = hashlib.sha512(struct.pack(f"<Q{arr.ndim}Q", arr.ndim, *arr.shape))
        digest.update(memoryview(np.ascontiguousarray(values)).cast("B"))
        return digest.digest()

    def __repr__(self) -> str:
        return "ExactHasher()"


def hasher_for(kind: str) -> InputHasher:
    """The default hasher for a dataset kind: the float pHash (:class:`DCTHasher`) for ``image``, SHA-512 for
    ``tabular``. (Until issue 12 images used imagehash's pHash, :class:`PerceptualHasher`; the hasher name
    is part of the key derivation, so the switch re-draws every image delay once.)"""
    if kind == "image":
        return DCTHasher()
    if kind == "tabular":
        return ExactHasher()
    raise ConfigError(f"unknown input kind {kind!r}; expected 'image' or 'tabular'")

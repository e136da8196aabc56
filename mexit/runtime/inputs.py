"""What a runtime accepts as input: the checks every ``predict`` runs before (or, for finiteness, with) its backend.

Inputs: a numpy array ``(n, *input_shape)`` with ``n >= 1``, finite values, of a real numeric dtype. Floats of any
width are cast to float32. For image bundles ``uint8`` is accepted and scaled by 1/255 (the training convention);
other integer dtypes are refused for images (their scale is ambiguous). For tabular bundles integers are cast as
they are. Booleans, complex numbers, strings and objects are refused: cast explicitly. Every refusal is an
:class:`mexit.errors.InputError` naming what was expected and what was given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mexit.errors import InputError


def nonfinite_message(x: np.ndarray) -> str:
    """The one-line refusal of an input holding NaN or infinite values (counted)."""
    return f"expected finite values, got {int(x.size - np.count_nonzero(np.isfinite(x)))} NaN/inf value(s)"


def validate_inputs(x: Any, input_shape: tuple[int, ...], kind: str, *, finite: bool = True) -> np.ndarray:
    """Check ``x`` against the bundle's input spec and return it as C-contiguous float32 (see the module doc).

    ``finite=False`` skips the finiteness check of a float32 input that needs no conversion, for a caller whose
    backend checks it itself (``OrtCpuBackend.predict_one``, inside its graph); converted inputs are always checked.
    """
    if (
        type(x) is np.ndarray
        and x.dtype == np.float32
        and x.shape[1:] == input_shape
        and x.ndim == len(input_shape) + 1
        and x.shape[0] > 0
        and x.flags.c_contiguous
    ):  # the common case, kept cheap: it is on every request's latency path
        if finite and not np.isfinite(x).all():
            raise InputError(nonfinite_message(x))
        return x
    expected = f"(n, {', '.join(map(str, input_shape))})"
    if not isinstance(x, np.ndarray):
        raise InputError(f"expected a numpy array of shape {expected} float32, got {type(x).__name__}")
    dt = x.dtype
    if dt.kind not in "fiu":
        raise InputError(
            f"expected a real numeric array (float32 preferred), got dtype {dt}; cast it, e.g. x.astype(np.float32)"
        )
    if dt.kind in "iu" and kind == "image" and dt != np.uint8:
        raise InputError(
            f"expected image inputs as float32 in [0, 1] (or uint8 in [0, 255]), got dtype {dt}; "
            "convert with x.astype(np.float32) / 255 if they are 0..255 pixels"
        )
    if x.ndim != len(input_shape) + 1:
        hint = "; add a batch axis (x[None])" if tuple(x.shape) == tuple(input_shape) else ""
        raise InputError(f"expected an array of rank {len(input_shape) + 1} {expected}, got shape {x.shape}{hint}")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise InputError(f"expected per-sample shape {tuple(input_shape)} {expected}, got shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"expected a non-empty batch {expected}, got shape {x.shape}")
    if dt == np.uint8 and kind == "image":
        out = x.astype(np.float32)
        out /= np.float32(255.0)  # division, exactly as mexit.data and the trainer scale pixels
        return out
    with np.errstate(over="ignore"):  # float64 beyond the float32 range becomes inf: reported just below
        out = np.ascontiguousarray(x, dtype=np.float32)
    if dt.kind == "f" and not np.isfinite(out).all():
        raise InputError(nonfinite_message(out)
                         + (" (float64 values beyond the float32 range overflow)" if dt.itemsize > 4 else ""))
    return out

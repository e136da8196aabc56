"""Reader for TinyImageNet-200 in the Stanford/Kaggle layout (``tiny-imagenet-200``).

The labelled images are ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG``
(labels in ``val/val_annotations.txt``); both are pooled, since the 4-way split re-partitions
everything (``test/`` has no labels and is ignored). Classes follow the order of ``wnids.txt``. The
real set contains some grayscale JPEGs, so every image is converted to RGB.

Image size: the copy's own. The first training image decides it: a 32x32 copy (a common downsampled variant)
is used at 32x32 — the image backbones have a 32-px variant — rather than silently upsampled, and the loader
says so in one log line; any image of another size is resized to that size (also said once).

Decoding is lazy: ``Dataset.x`` is a :class:`LazyImages` that decodes an image the first time it is indexed
(in a thread pool: Pillow releases the GIL), so ``mexit train --limit 200`` decodes the ~1,000 images of its
split instead of all 110,000 (~45 s). Labels come from the file layout alone, which is all the split needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mexit.data._files import TINYIMAGENET_URL, existing_root, find_dir
from mexit.data.dataset import Dataset
from mexit.errors import DataError

log = logging.getLogger(__name__)

SIZE = 64
TINYIMAGENET_NORMALIZATION = ([0.4802, 0.4481, 0.3975], [0.2770, 0.2691, 0.2821])
_IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
_PROGRESS_MIN_IMAGES = 1000


def load_tinyimagenet(root: Path | None) -> Dataset:
    """TinyImageNet-200 from ``tiny-imagenet-200`` (or its parent): train + val images, 200 classes."""
    root = existing_root(root, "tinyimagenet", TINYIMAGENET_URL)
    folder = find_dir(root, ("tiny-imagenet-200",), lambda d: (d / "wnids.txt").is_file())
    if folder is None:
        raise DataError(f"no TinyImageNet in {root}: expected wnids.txt, train/<wnid>/images/*.JPEG and "
                        f"val/val_annotations.txt with val/images/ there or in {root / 'tiny-imagenet-200'}; "
                        f"get {TINYIMAGENET_URL} and extract it")
    wnids = _read_wnids(folder / "wnids.txt")
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    for path, label in _train_files(folder, wnids):
        files.append(path)
        labels.append(label)
    for path, label in _val_files(folder, index):
        files.append(path)
        labels.append(label)
    size = _native_size(files[0]) if files else SIZE
    if size != SIZE:
        log.info("tinyimagenet copy in %s has %dx%d images: using them at that size (no upsampling to %dx%d)",
                 folder, size, size, SIZE, SIZE)
    x = LazyImages(files, size)
    log.info("indexed tinyimagenet: %d images of %d classes from %s (decoded on first use)", len(files),
             len(wnids), folder)
    return Dataset(name="tinyimagenet", x=x, y=np.asarray(labels, dtype=np.int64),  # type: ignore[arg-type]
                   num_classes=len(wnids), kind="image", input_shape=(3, size, size),
                   normalization=TINYIMAGENET_NORMALIZATION, class_names=_class_names(folder / "words.txt", wnids))


def _native_size(path: Path) -> int:
    """32 for a 32x32 copy, else the standard 64 (every other size is resized to it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return 32 if img.size == (32, 32) else SIZE
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode {path}: {type(exc).__name__}: {exc}; replace the file or extract "
                        f"{TINYIMAGENET_URL} again") from None


class LazyImages:
    """A read-only ``(n, 3, size, size)`` uint8 array of image files that decodes each image on first access.

    Supports what :class:`~mexit.data.Dataset` and the training code use: ``len``, ``shape``, ``dtype``,
    ``ndim``, indexing by an int, a slice, an index array or a boolean mask (returning a NumPy array), and
    ``np.asarray``/``astype`` (which decode everything). Decoded images are kept, so nothing is decoded twice.
    """

    def __init__(self, files: list[Path], size: int) -> None:
        self.files, self.size = list(files), int(size)
        self._cache = np.empty((len(self.files), 3, self.size, self.size), dtype=np.uint8)  # pages on demand
        self._done = np.zeros(len(self.files), dtype=bool)
        self._resize_noted = False

    @property
    def shape(self) -> tuple[int, ...]:
        return self._cache.shape

    @property
    def dtype(self) -> np.dtype:
        return self._cache.dtype

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.files)

    def decoded(self) -> int:
        """How many images have been decoded so far."""
        return int(self._done.sum())

    def __getitem__(self, idx: object) -> np.ndarray:
        rows = np.arange(len(self.files))[idx]  # type: ignore[index]
        self._ensure(np.unique(np.atleast_1d(rows)))
        return self._cache[idx]  # type: ignore[index]

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        self._ensure(np.arange(len(self.files)))
        return self._cache if dtype is None else self._cache.astype(dtype)

    def astype(self, dtype: object) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def _ensure(self, rows: np.ndarray) -> None:
        todo = rows[~self._done[rows]]
        if len(todo) == 0:
            return
        for i, img in zip(todo, _decode_all([self.files[i] for i in todo], self.size), strict=True):
            self._cache[i] = img
        self._done[todo] = True


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    wnids = [w for w in wnids if w]
    if not wnids:
        raise DataError(f"{path} lists no classes; expected one WordNet id (e.g. n01443537) per line; "
                        f"get {TINYIMAGENET_URL}")
    if len(set(wnids)) != len(wnids):
        dup = next(w for w in wnids if wnids.count(w) > 1)
        raise DataError(f"{path} lists class {dup} twice; expected each WordNet id once; get {TINYIMAGENET_URL}")
    return wnids


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())


def _train_files(folder: Path, wnids: list[str]) -> Iterator[tuple[Path, int]]:
    for label, wnid in enumerate(wnids):
        class_dir = folder / "train" / wnid
        images_dir = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
        if not images_dir.is_dir():
            raise DataError(f"{class_dir}/images is missing (class {wnid} of wnids.txt); the TinyImageNet copy is "
                            f"incomplete: extract {TINYIMAGENET_URL} again")
        images = _images_in(images_dir)
        if not images:
            raise DataError(f"{images_dir} holds no .JPEG images (class {wnid}); the TinyImageNet copy is "
                            f"incomplete: extract {TINYIMAGENET_URL} again")
        for path in images:
            yield path, label


def _val_files(folder: Path, index: dict[str, int]) -> Iterator[tuple[Path, int]]:
    annotations = folder / "val" / "val_annotations.txt"
    if not annotations.is_file():
        log.warning("%s is missing; using the training images only", annotations)
        return
    text = annotations.read_text(encoding="utf-8", errors="replace")
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(f"{annotations} line {line_no}: expected tab-separated 'filename<TAB>wnid<TAB>bbox', "
                            f"got {line[:60]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DataError(f"{annotations} line {line_no}: class {wnid} is not listed in wnids.txt; the "
                            f"TinyImageNet copy is inconsistent: extract {TINYIMAGENET_URL} again")
        path = folder / "val" / "images" / name
        if not path.is_file():
            raise DataError(f"{path} is missing (listed in {annotations} line {line_no}); extract "
                            f"{TINYIMAGENET_URL} again")
        yield path, index[wnid]


def _class_names(words: Path, wnids: list[str]) -> list[str]:
    """Short names (first synonym) from words.txt when present, else the WordNet ids themselves."""
    names: dict[str, str] = {}
    if words.is_file():
        for line in words.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if text:
                names[wnid.strip()] = text.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


def _decode(path: Path, size: int = SIZE) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                if not _RESIZE_LOGGED:
                    _RESIZE_LOGGED.append(path)
                    log.info("tinyimagenet: resizing images that are not %dx%d (first: %s, %dx%d)", size, size,
                             path.name, *rgb.size)
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode {path}: {type(exc).__name__}: {exc}; replace the file or extract "
                        f"{TINYIMAGENET_URL} again") from None


_RESIZE_LOGGED: list[Path] = []  # one log line per process, not one per image


def _decode_all(files: list[Path], size: int = SIZE) -> np.ndarray:
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    bar = tqdm(total=len(files), desc="decoding TinyImageNet", unit="img", leave=False,
               disable=len(files) < _PROGRESS_MIN_IMAGES)
    try:
        for i, img in enumerate(pool.map(lambda f: _decode(f, size), files)):
            x[i] = img
            bar.update(1)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)  # a bad file stops the rest instead of decoding on
    return x

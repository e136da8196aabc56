"""Reader for TinyImageNet-200 in the Stanford/Kaggle layout (``tiny-imagenet-200``).

The labelled images are ``train/<wnid>/images/*.JPEG`` (500 per class) and ``val/images/*.JPEG``
(labels in ``val/val_annotations.txt``); both are pooled, since the 4-way split re-partitions
everything (``test/`` has no labels and is ignored). Classes follow the order of ``wnids.txt``. The
real set contains some grayscale JPEGs, so every image is converted to RGB (and resized to 64x64 if it
is not). Decoding 110,000 JPEGs takes a while, so it runs in a thread pool (Pillow releases the GIL)
behind a progress bar.
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
    x = _decode_all(files)
    log.info("loaded tinyimagenet: %d images of %d classes from %s", len(files), len(wnids), folder)
    return Dataset(name="tinyimagenet", x=x, y=np.asarray(labels, dtype=np.int64), num_classes=len(wnids),
                   kind="image", input_shape=(3, SIZE, SIZE), normalization=TINYIMAGENET_NORMALIZATION,
                   class_names=_class_names(folder / "words.txt", wnids))


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


def _decode(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != (SIZE, SIZE):
                rgb = rgb.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode {path}: {type(exc).__name__}: {exc}; replace the file or extract "
                        f"{TINYIMAGENET_URL} again") from None


def _decode_all(files: list[Path]) -> np.ndarray:
    x = np.empty((len(files), 3, SIZE, SIZE), dtype=np.uint8)
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    bar = tqdm(total=len(files), desc="decoding TinyImageNet", unit="img", leave=False,
               disable=len(files) < _PROGRESS_MIN_IMAGES)
    try:
        for i, img in enumerate(pool.map(_decode, files)):
            x[i] = img
            bar.update(1)
    finally:
        bar.close()
        pool.shutdown(wait=True, cancel_futures=True)  # a bad file stops the rest instead of decoding on
    return x

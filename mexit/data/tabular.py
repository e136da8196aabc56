"""Readers for the privacytrustlab tabular datasets the paper uses: Purchase-100, Texas-100 and Location.

Files are read exactly as https://github.com/privacytrustlab/datasets ships them, either extracted or
straight out of the ``.tgz`` (streamed, nothing written to disk). Labels in the files are 1-based and
become 0-based ``int64``; features become ``float32``. A label outside 1..K, a wrong column count or a
non-numeric cell is an error naming the file and line, never a silently shifted class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mexit.data._csv import iter_csv_blocks
from mexit.data._files import PRIVACYTRUSTLAB_URL, existing_root, find_file, iter_tar_members
from mexit.data.dataset import Dataset
from mexit.errors import DataError

log = logging.getLogger(__name__)

PURCHASE_FEATURES, PURCHASE_CLASSES = 600, 100
TEXAS_FEATURES, TEXAS_CLASSES = 6169, 100
LOCATION_FEATURES, LOCATION_CLASSES = 446, 30


def check_labels(values: np.ndarray, lines: np.ndarray, *, source: str, num_classes: int) -> np.ndarray:
    """1-based integer labels ``values`` (read at file ``lines``) as 0-based int64; DataError if out of range."""
    bad = np.flatnonzero((values != np.round(values)) | (values < 1) | (values > num_classes))
    if len(bad):
        i = bad[0]
        raise DataError(f"{source} line {lines[i]}: label {values[i]:g} is not an integer in 1..{num_classes}; "
                        "the file is damaged or belongs to another dataset")
    return values.astype(np.int64) - 1


def read_labelled_csv(
    fh: BinaryIO, *, source: str, features: int, num_classes: int, total_bytes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parse CSV lines ``label,f1..fD`` into float32 features (N, D) and 0-based int64 labels (N,)."""
    xs, ys = [], []
    for values, lines in iter_csv_blocks(fh, source=source, columns=features + 1, total_bytes=total_bytes,
                                         what=f"a label then {features} features"):
        ys.append(check_labels(values[:, 0], lines, source=source, num_classes=num_classes))
        xs.append(values[:, 1:].astype(np.float32))
    return _stack(xs, ys, source, features)


def read_csv_matrix(fh: BinaryIO, *, source: str, columns: int, what: str,
                    total_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Parse a headerless numeric CSV into float32 (N, columns) plus the file line of each row."""
    blocks = list(iter_csv_blocks(fh, source=source, columns=columns, what=what, total_bytes=total_bytes))
    if not blocks:
        return np.empty((0, columns), np.float32), np.empty(0, np.int64)
    values = np.concatenate([v.astype(np.float32) for v, _ in blocks])
    return values, np.concatenate([lines for _, lines in blocks])


def _stack(xs: list[np.ndarray], ys: list[np.ndarray], source: str, features: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate(xs) if xs else np.empty((0, features), np.float32)
    y = np.concatenate(ys) if ys else np.empty(0, np.int64)
    if not len(y):
        raise DataError(f"{source} holds no data rows; replace it with a fresh copy from {PRIVACYTRUSTLAB_URL}")
    return x, y


def _file_size(path: Path) -> int:
    return path.stat().st_size


def _read_single_csv(
    root: Path | None, *, dataset: str, csv_name: str, archive_name: str, subdir: str,
    parse: Callable[[BinaryIO, str, int | None], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """Find ``csv_name`` (extracted) or ``archive_name`` (holding it) under ``root`` and parse it."""
    root = existing_root(root, dataset, PRIVACYTRUSTLAB_URL)
    path = find_file(root, (csv_name, archive_name), (subdir,))
    if path is None:
        raise DataError(f"no {dataset} data in {root}: expected the file '{csv_name}' or '{archive_name}' "
                        f"(holding it) there or in {root / subdir}; get {archive_name} from {PRIVACYTRUSTLAB_URL}")
    if path.name == archive_name:
        for member, fh in iter_tar_members(path):
            if Path(member.name).name == csv_name:
                return parse(fh, f"{path}:{member.name}", member.size)
        raise DataError(f"{path} holds no file named '{csv_name}'; it is not the {dataset} archive from "
                        f"{PRIVACYTRUSTLAB_URL}")
    with open(path, "rb") as fh:
        return parse(fh, str(path), _file_size(path))


def load_purchase(root: Path | None) -> Dataset:
    """Purchase-100: ``dataset_purchase`` (CSV ``label,f1..f600``, label 1..100), extracted or in its .tgz."""
    def parse(fh: BinaryIO, source: str, size: int | None) -> tuple[np.ndarray, np.ndarray]:
        return read_labelled_csv(fh, source=source, features=PURCHASE_FEATURES, num_classes=PURCHASE_CLASSES,
                                 total_bytes=size)

    x, y = _read_single_csv(root, dataset="purchase", csv_name="dataset_purchase",
                            archive_name="dataset_purchase.tgz", subdir="purchase", parse=parse)
    return _tabular("purchase", x, y, PURCHASE_CLASSES)


def load_location(root: Path | None) -> Dataset:
    """Location (Foursquare Bangkok): ``bangkok`` (CSV ``"label",f1..f446``, label 1..30), extracted or in its .tgz."""
    def parse(fh: BinaryIO, source: str, size: int | None) -> tuple[np.ndarray, np.ndarray]:
        return read_labelled_csv(fh, source=source, features=LOCATION_FEATURES, num_classes=LOCATION_CLASSES,
                                 total_bytes=size)

    x, y = _read_single_csv(root, dataset="location", csv_name="bangkok", archive_name="dataset_location.tgz",
                            subdir="location", parse=parse)
    return _tabular("location", x, y, LOCATION_CLASSES)


def load_texas(root: Path | None) -> Dataset:
    """Texas-100: ``texas/100/feats`` (6169 binary features per line) and ``texas/100/labels`` (1..100).

    ``root`` may be the folder holding ``texas/``, the ``texas`` or ``texas/100`` folder itself, or a
    folder holding ``dataset_texas.tgz`` (or that archive itself).
    """
    root = existing_root(root, "texas", PRIVACYTRUSTLAB_URL)
    feats = labels = None
    for folder in (root / "texas" / "100", root / "100", root):
        if (folder / "feats").is_file() or (folder / "labels").is_file():
            feats, labels = folder / "feats", folder / "labels"
            break
    if feats is not None and labels is not None:
        for path in (feats, labels):
            if not path.is_file():
                raise DataError(f"{path} is missing: Texas-100 needs both 'feats' and 'labels' in {path.parent}; "
                                f"get dataset_texas.tgz from {PRIVACYTRUSTLAB_URL}")
        with open(feats, "rb") as fh:
            x = _parse_texas_feats(fh, str(feats), _file_size(feats))[0]
        with open(labels, "rb") as fh:
            y = _parse_texas_labels(fh, str(labels), _file_size(labels))
        return _texas_dataset(x, y, str(feats), str(labels))

    archive = find_file(root, ("dataset_texas.tgz",), ("texas",))
    if archive is None:
        raise DataError(f"no Texas-100 data in {root}: expected texas/100/feats and texas/100/labels (or "
                        f"dataset_texas.tgz holding them) there; get dataset_texas.tgz from {PRIVACYTRUSTLAB_URL}")
    found: dict[str, tuple[np.ndarray, str]] = {}
    for member, fh in iter_tar_members(archive):
        base, parent = Path(member.name).name, Path(member.name).parent.name
        if base in ("feats", "labels") and parent in ("100", "") and base not in found:
            source = f"{archive}:{member.name}"
            if base == "feats":
                found[base] = (_parse_texas_feats(fh, source, member.size)[0], source)
            else:
                found[base] = (_parse_texas_labels(fh, source, member.size), source)
    missing = [name for name in ("feats", "labels") if name not in found]
    if missing:
        raise DataError(f"{archive} holds no texas/100/{' or texas/100/'.join(missing)}; it is not the Texas-100 "
                        f"archive from {PRIVACYTRUSTLAB_URL}")
    return _texas_dataset(found["feats"][0], found["labels"][0], found["feats"][1], found["labels"][1])


def _parse_texas_feats(fh: BinaryIO, source: str, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    return read_csv_matrix(fh, source=source, columns=TEXAS_FEATURES, what=f"{TEXAS_FEATURES} features",
                           total_bytes=size)


def _parse_texas_labels(fh: BinaryIO, source: str, size: int | None) -> np.ndarray:
    values, lines = read_csv_matrix(fh, source=source, columns=1, what="one label", total_bytes=size)
    return check_labels(values[:, 0].astype(np.float64), lines, source=source, num_classes=TEXAS_CLASSES)


def _texas_dataset(x: np.ndarray, y: np.ndarray, feats_source: str, labels_source: str) -> Dataset:
    if len(x) != len(y):
        raise DataError(f"{feats_source} has {len(x)} rows but {labels_source} has {len(y)} labels; they must "
                        f"match line for line: replace both with a fresh copy from {PRIVACYTRUSTLAB_URL}")
    if not len(y):
        raise DataError(f"{feats_source} holds no data rows; replace it with a fresh copy from {PRIVACYTRUSTLAB_URL}")
    return _tabular("texas", x, y, TEXAS_CLASSES)


def _tabular(name: str, x: np.ndarray, y: np.ndarray, num_classes: int) -> Dataset:
    log.info("loaded %s: %d rows, %d features, %d classes present", name, len(y), x.shape[1], len(np.unique(y)))
    return Dataset(name=name, x=np.ascontiguousarray(x, dtype=np.float32), y=y, num_classes=num_classes,
                   kind="tabular", input_shape=(x.shape[1],), normalization=None)


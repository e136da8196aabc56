"""Locating a dataset's files under the user's ``--data-root`` and reading members of ``.tgz`` archives.

A reader accepts the dataset's own folder (``cifar-10-batches-py``), its parent, or one shared data
root holding every dataset in its usual folder, so a single ``--data-root`` works for all of them.
Archives are read in streaming mode without extracting anything to disk.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from mexit.errors import DataError

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip or its Kaggle mirror (tiny-imagenet-200)"
PRIVACYTRUSTLAB_URL = "https://github.com/privacytrustlab/datasets"


def existing_root(root: Path | None, dataset: str, source: str) -> Path:
    """``root`` as an existing path, or a :class:`DataError` saying what to pass instead."""
    if root is None:
        raise DataError(f"--data-root is required for {dataset}; point it at the folder holding the {dataset} "
                        f"files (get them from {source})")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist; point --data-root at the folder holding the {dataset} "
                        f"files (get them from {source})")
    return root


def find_dir(root: Path, subdirs: tuple[str, ...], is_match: Callable[[Path], bool]) -> Path | None:
    """The first of ``root`` and ``root/<subdir>`` that ``is_match`` accepts, or None."""
    for candidate in (root, *(root / sub for sub in subdirs)):
        if candidate.is_dir() and is_match(candidate):
            return candidate
    return None


def find_file(root: Path, names: tuple[str, ...], subdirs: tuple[str, ...] = ()) -> Path | None:
    """``root`` itself when it is a file named like one of ``names``, else the first ``<dir>/<name>`` found.

    Directories are tried in order ``root``, ``root/<subdir>``...; within each, names in the given order
    (so an extracted file wins over the archive holding it).
    """
    if root.is_file():
        return root if root.name in names else None
    for folder in (root, *(root / sub for sub in subdirs)):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def iter_tar_members(archive: Path) -> Iterator[tuple[tarfile.TarInfo, BinaryIO]]:
    """Regular-file members of a (compressed) tar archive in archive order, each with an open stream.

    Streaming mode reads the archive once, front to back; a stream is valid only until the next member
    is requested. A damaged archive raises :class:`DataError` naming it.
    """
    try:
        with tarfile.open(archive, mode="r|*") as tf:
            for member in tf:
                if not member.isfile() or Path(member.name).name.startswith("._"):  # skip macOS metadata
                    continue
                fh = tf.extractfile(member)
                if fh is not None:
                    yield member, fh
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {archive}: {type(exc).__name__}: {exc}; the archive is damaged or not a "
                        "tar/tar.gz file; replace it with a fresh download") from None

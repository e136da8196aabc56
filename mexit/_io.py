"""Small file helpers used by every stage: atomic writes, hashing and provenance records.

Every artifact mexit writes goes through :func:`atomic_write_bytes` (temp file in the same directory,
fsync, rename), so an interrupted run never leaves a half-written file that a re-run could mistake for
a valid one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

_PROVENANCE_PACKAGES = ("mexit", "numpy", "scipy", "scikit-learn", "torch", "onnx", "onnxruntime")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; artifacts should get the usual permissions (0666 minus the umask).
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on error delete it.

    The file gets the usual permissions (0666 minus the umask), or 0600 when ``private`` (secrets).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        if private:
            os.chmod(tmp_path, 0o600)
        else:
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON data (numpy scalars and arrays as numbers and lists, Paths as strings)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays, Paths: the usual suspects in metrics dictionaries.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_versions(names: tuple[str, ...] = _PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed versions of the packages that shape results (None when absent), without importing them."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def provenance(**extra: Any) -> dict[str, Any]:
    """A record of what produced an artifact: time, interpreter, platform, package versions, plus ``extra``."""
    record: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": package_versions(),
    }
    record.update(extra)
    return record


def save_npz(path: str | os.PathLike[str], arrays: dict[str, Any], header: dict[str, Any]) -> None:
    """Write ``arrays`` and a JSON ``header`` as one ``.npz``, atomically (no pickles, readable anywhere)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, header=np.array(json.dumps(header, sort_keys=True, default=_json_default)), **arrays)


def load_npz(path: str | os.PathLike[str], names: tuple[str, ...] | None = None
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The JSON header and the arrays (``names``, or all but the header) of a :func:`save_npz` file.

    Raises ``ValueError`` for anything that is not such a file (unreadable, truncated, no header), so
    callers can turn it into an error that names the file and what to do.
    """
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            present = [n for n in data.files if n != "header"]
            wanted = present if names is None else [n for n in names if n in present]
            arrays = {name: data[name] for name in wanted}
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ValueError(str(exc) or type(exc).__name__) from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, arrays

"""A fast, strict reader for the numeric CSV files of the privacytrustlab datasets.

Purchase-100 (~240 MB of text) and Texas-100 (~830 MB) are too large for ``np.loadtxt`` (about 10 MB/s),
and their cells are almost always small non-negative integers (``0``/``1`` features, ``"13"`` labels).
So the text is read in blocks of whole lines and each block is parsed with vectorised numpy on its
bytes: column counts from comma counts per line, values from digit positions. A block with anything
else in it (decimals, signs, spaces) goes through ``np.loadtxt``; a block that fails there is scanned
line by line in Python, only to name the offending line in the error. Blank lines are skipped; ``"``
quotes and ``\\r`` are ignored; line numbers in messages are 1-based lines of the file.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from mexit.errors import DataError

BLOCK_BYTES = 16 << 20
_PROGRESS_MIN_BYTES = 64 << 20
_MAX_FAST_DIGITS = 15  # integers up to 15 digits are exact in float64
_NL, _COMMA = 10, 44


def iter_csv_blocks(
    fh: BinaryIO, *, source: str, columns: int, what: str, total_bytes: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(values, line_numbers)`` per block of the CSV ``fh``: float64 (rows, columns) and int64 (rows,).

    ``source`` names the file in errors; ``what`` describes the expected columns (e.g. "label + 600
    features"). Raises :class:`DataError` naming the file and line for a wrong column count, an empty or
    non-numeric cell, and for an unreadable (truncated) file.
    """
    bar = tqdm(total=total_bytes, desc=f"reading {source.rsplit('/', 1)[-1]}", unit="B", unit_scale=True,
               disable=total_bytes is None or total_bytes < _PROGRESS_MIN_BYTES, leave=False)
    with bar:
        for block, first_line in _line_blocks(fh, source):
            bar.update(len(block))
            yield _parse_block(block, first_line, source=source, columns=columns, what=what)


def _line_blocks(fh: BinaryIO, source: str) -> Iterator[tuple[bytes, int]]:
    """Blocks of whole lines (each ending in a newline) and the 1-based line number each starts at."""
    carry, line, first = b"", 1, True
    while True:
        try:
            chunk = fh.read(BLOCK_BYTES)
        except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
            raise DataError(f"cannot read {source}: {type(exc).__name__}: {exc} (truncated or corrupt file?); "
                            "replace it with a fresh copy") from None
        if first:
            chunk = chunk.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark from some editors
            first = False
        if not chunk:
            break
        data = carry + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        yield data[:cut], line
        line += data.count(b"\n", 0, cut)
        carry = data[cut:]
    if carry:
        yield carry + b"\n", line


def _parse_block(
    block: bytes, first_line: int, *, source: str, columns: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one block of whole lines; see the module docstring for the fast and the general path."""
    if b'"' in block or b"\r" in block:
        block = block.replace(b'"', b"").replace(b"\r", b"")
    u = np.frombuffer(block, dtype=np.uint8)
    line_end = np.flatnonzero(u == _NL)
    line_start = np.concatenate(([0], line_end[:-1] + 1))
    nonempty = line_end > line_start
    line_no = first_line + np.arange(len(line_end), dtype=np.int64)
    comma_pos = np.flatnonzero(u == _COMMA)
    n_cols = np.searchsorted(comma_pos, line_end) - np.searchsorted(comma_pos, line_start) + 1
    bad = np.flatnonzero(nonempty & (n_cols != columns))
    if len(bad):
        i = bad[0]
        raise DataError(f"{source} line {line_no[i]}: expected {columns} comma-separated values ({what}), found "
                        f"{n_cols[i]}; the file is damaged or not in the expected format")
    rows = line_no[nonempty]
    if not len(rows):
        return np.empty((0, columns)), rows
    if block.translate(None, b"0123456789,\n"):  # anything but plain non-negative integers
        return _parse_block_slow(block, first_line, source=source, columns=columns, what=what)
    if not nonempty.all():
        block = b"\n".join(line for line in block.split(b"\n") if line) + b"\n"
        u = np.frombuffer(block, dtype=np.uint8)
        line_end = np.flatnonzero(u == _NL)

    # Only digits, commas and newlines are left, so separators are exactly the bytes below "0". Each field
    # ends at a separator; its last digit sits just before it, and (rare) longer numbers add their
    # leading digits, found where a digit is followed by another digit.
    is_sep = u < 48
    adjacent = np.flatnonzero(is_sep[1:] & is_sep[:-1]) + 1
    if is_sep[0] or len(adjacent):
        at = 0 if is_sep[0] else int(adjacent[0])
        line = rows[np.searchsorted(line_end, at)]
        raise DataError(f"{source} line {line}: empty value (two adjacent commas or a comma at the start or end "
                        f"of the line); expected {columns} numeric values ({what})")
    sep_pos = np.flatnonzero(is_sep)
    values = u[sep_pos - 1].astype(np.float64) - 48.0
    leading = np.flatnonzero(~is_sep[:-1] & ~is_sep[1:])
    if len(leading):
        field = np.searchsorted(sep_pos, leading)
        power = sep_pos[field] - leading - 1
        if power.max() >= _MAX_FAST_DIGITS:
            return _parse_block_slow(block, first_line, source=source, columns=columns, what=what)
        np.add.at(values, field, (u[leading].astype(np.float64) - 48.0) * 10.0**power)
    return values.reshape(len(rows), columns), rows


def _parse_block_slow(
    block: bytes, first_line: int, *, source: str, columns: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """General numbers (decimals, signs, exponents) via ``np.loadtxt``; on failure, find the bad line."""
    lines = block.decode("latin-1").replace('"', "").replace("\r", "").split("\n")
    numbered = [(first_line + i, line) for i, line in enumerate(lines) if line.strip()]
    rows = np.array([n for n, _ in numbered], dtype=np.int64)
    try:
        values = np.loadtxt([line for _, line in numbered], delimiter=",", comments=None, dtype=np.float64, ndmin=2)
    except ValueError:
        values = None
    if values is not None and values.shape == (len(numbered), columns) and np.isfinite(values).all():
        return values, rows
    for line_no, line in numbered:
        cells = line.split(",")
        if len(cells) != columns:
            raise DataError(f"{source} line {line_no}: expected {columns} comma-separated values ({what}), found "
                            f"{len(cells)}; the file is damaged or not in the expected format")
        for col, cell in enumerate(cells, start=1):
            try:
                ok = bool(np.isfinite(float(cell)))
            except ValueError:
                ok = False
            if not ok:
                shown = cell.strip()[:20]
                raise DataError(f"{source} line {line_no}, column {col}: {shown!r} is not a finite number; "
                                f"expected {columns} numeric values ({what})")
    raise DataError(f"{source} (lines {first_line}..{first_line + len(lines) - 1}): cannot parse as numeric CSV; "
                    f"expected {columns} numeric values per line ({what})")

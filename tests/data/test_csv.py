"""The vectorised CSV parser behind the tabular readers: agreement with np.loadtxt, line numbers, edge cases."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mexit.data import _csv
from mexit.errors import DataError


def parse(text: bytes, columns: int) -> tuple[np.ndarray, np.ndarray]:
    blocks = list(_csv.iter_csv_blocks(io.BytesIO(text), source="f.csv", columns=columns, what="test"))
    if not blocks:
        return np.empty((0, columns)), np.empty(0, np.int64)
    return np.concatenate([v for v, _ in blocks]), np.concatenate([r for _, r in blocks])


@pytest.mark.parametrize("block_bytes", [7, 64, 1 << 20])
def test_matches_loadtxt_across_block_boundaries(monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    monkeypatch.setattr(_csv, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(0)
    values = rng.integers(0, 2, size=(50, 9))
    values[:, 0] = rng.integers(1, 1000, size=50)  # multi-digit labels
    values[7, 3] = 123456789
    text = ("\n".join(",".join(str(v) for v in row) for row in values) + "\n").encode()
    got, lines = parse(text, 9)
    np.testing.assert_array_equal(got, values)
    np.testing.assert_array_equal(got, np.loadtxt(io.BytesIO(text), delimiter=","))
    assert lines.tolist() == list(range(1, 51))


def test_quotes_crlf_blank_lines_bom_and_missing_final_newline() -> None:
    text = b'\xef\xbb\xbf"3",0,1\r\n\r\n"12",1,0\r\n\n"7",1,1'
    got, lines = parse(text, 3)
    assert got.tolist() == [[3, 0, 1], [12, 1, 0], [7, 1, 1]]
    assert lines.tolist() == [1, 3, 5]  # file lines, blank ones counted


def test_general_numbers_take_the_slow_path() -> None:
    got, lines = parse(b"1,0.5,-2\n2,1e-3,+4\n", 3)
    np.testing.assert_allclose(got, [[1, 0.5, -2], [2, 1e-3, 4]])
    assert lines.tolist() == [1, 2]


def test_empty_input_gives_no_rows() -> None:
    assert parse(b"", 3)[0].shape == (0, 3)
    assert parse(b"\n\n", 3)[0].shape == (0, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"1,2,3\n\n4,5\n", r"f.csv line 3: expected 3 comma-separated values \(test\), found 2"),
        (b"1,2,3\n4,5,6,7\n", r"f.csv line 2: expected 3 comma-separated values \(test\), found 4"),
        (b"1,2,3\n4,,6\n", r"f.csv line 2: empty value"),
        (b"1,2,3\n\n4,5,\n", r"f.csv line 3: empty value"),
        (b",2,3\n", r"f.csv line 1: empty value"),
        (b"1,2,3\n4,abc,6\n", r"f.csv line 2, column 2: 'abc' is not a finite number"),
        (b"1,2,3\n4,5,nan\n", r"f.csv line 2, column 3: 'nan' is not a finite number"),
        (b"1,2,3\n4,5,6\n7,8,1.2.3\n", r"f.csv line 3, column 3: '1.2.3' is not a finite number"),
    ],
)
def test_errors_name_file_and_line(text: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message) as err:
        parse(text, 3)
    assert "\n" not in str(err.value)


def test_read_failure_is_data_error() -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    with pytest.raises(DataError, match=r"cannot read f.csv: EOFError"):
        parse_from(Broken(), 3)


def parse_from(fh: io.BytesIO, columns: int) -> list:
    return list(_csv.iter_csv_blocks(fh, source="f.csv", columns=columns, what="test"))

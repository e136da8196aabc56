"""Purchase-100, Texas-100 and Location readers: the real Location archive and small generated files."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mexit.data import Dataset, load_dataset
from mexit.errors import DataError
from tests.data._factories import SHARED_DATA, labelled_csv, matrix_csv, random_binary, write_tgz

REAL_LOCATION = SHARED_DATA / "location" / "dataset_location.tgz"
PRIVACYTRUSTLAB = "https://github.com/privacytrustlab/datasets"


@pytest.fixture(scope="module")
def real_location() -> Dataset:
    if not REAL_LOCATION.is_file():
        pytest.skip(f"real Location archive not found at {REAL_LOCATION}")
    return load_dataset("location", REAL_LOCATION.parent)


def test_real_location(real_location: Dataset) -> None:
    ds = real_location
    assert ds.x.shape == (5010, 446) and ds.x.dtype == np.float32 and ds.kind == "tabular"
    assert ds.y.dtype == np.int64 and ds.num_classes == 30 and ds.normalization is None
    assert set(np.unique(ds.x).tolist()) == {0.0, 1.0}
    assert ds.y.min() == 0 and ds.y.max() == 29 and len(np.unique(ds.y)) == 30
    # Cross-check against numpy's own (slow, general) CSV parser on the same member.
    with tarfile.open(REAL_LOCATION) as tf:
        member = tf.extractfile("bangkok")
        assert member is not None
        ref = np.loadtxt(io.BytesIO(member.read()), delimiter=",", quotechar='"', comments=None)
    np.testing.assert_array_equal(ds.y, ref[:, 0].astype(np.int64) - 1)
    np.testing.assert_array_equal(ds.x, ref[:, 1:].astype(np.float32))


def test_real_location_shared_data_root_and_archive_path(real_location: Dataset) -> None:
    for root in (SHARED_DATA, REAL_LOCATION):  # a common data root with location/ inside, or the .tgz itself
        ds = load_dataset("location", root)
        np.testing.assert_array_equal(ds.y, real_location.y)


def _location_rows(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return np.arange(n) % 30 + 1, random_binary(rng, n, 446)


@pytest.mark.parametrize("packed", [False, True])
def test_generated_location(tmp_path: Path, packed: bool) -> None:
    labels, feats = _location_rows()
    text = labelled_csv(labels, feats, quote=True)
    if packed:
        write_tgz(tmp_path / "dataset_location.tgz", {"bangkok": text})
    else:
        (tmp_path / "bangkok").write_bytes(text)
    ds = load_dataset("location", tmp_path)
    np.testing.assert_array_equal(ds.y, labels - 1)
    np.testing.assert_array_equal(ds.x, feats.astype(np.float32))


@pytest.mark.parametrize("packed", [False, True])
def test_generated_purchase(tmp_path: Path, packed: bool) -> None:
    rng = np.random.default_rng(1)
    labels, feats = np.array([1, 100, 57, 3, 100, 12]), random_binary(rng, 6, 600)
    text = labelled_csv(labels, feats)
    if packed:
        write_tgz(tmp_path / "dataset_purchase.tgz", {"dataset_purchase": text})
    else:
        (tmp_path / "dataset_purchase").write_bytes(text)
    ds = load_dataset("purchase", tmp_path)
    assert ds.num_classes == 100 and ds.input_shape == (600,)
    np.testing.assert_array_equal(ds.y, labels - 1)
    np.testing.assert_array_equal(ds.x, feats.astype(np.float32))


def _texas_files(rows: int = 5, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 101, size=rows), random_binary(rng, rows, 6169)


@pytest.mark.parametrize("form", ["parent", "texas_dir", "texas_100_dir", "tgz", "tgz_path"])
def test_generated_texas_root_forms(tmp_path: Path, form: str) -> None:
    labels, feats = _texas_files()
    if form.startswith("tgz"):
        archive = write_tgz(tmp_path / "dataset_texas.tgz", {"texas/100/labels": matrix_csv(labels[:, None]),
                                                             "texas/100/feats": matrix_csv(feats)})
        root = archive if form == "tgz_path" else tmp_path
    else:
        folder = tmp_path / "texas" / "100"
        folder.mkdir(parents=True)
        (folder / "feats").write_bytes(matrix_csv(feats))
        (folder / "labels").write_bytes(matrix_csv(labels[:, None]))
        root = {"parent": tmp_path, "texas_dir": tmp_path / "texas", "texas_100_dir": folder}[form]
    ds = load_dataset("texas", root)
    assert ds.input_shape == (6169,) and ds.num_classes == 100
    np.testing.assert_array_equal(ds.y, labels - 1)
    np.testing.assert_array_equal(ds.x, feats.astype(np.float32))


def test_texas_count_mismatch(tmp_path: Path) -> None:
    labels, feats = _texas_files(rows=4)
    (tmp_path / "feats").write_bytes(matrix_csv(feats))
    (tmp_path / "labels").write_bytes(matrix_csv(labels[:3, None]))
    with pytest.raises(DataError, match=r"feats has 4 rows but .*labels has 3 labels"):
        load_dataset("texas", tmp_path)


def test_texas_missing_labels_file(tmp_path: Path) -> None:
    _, feats = _texas_files(rows=2)
    (tmp_path / "feats").write_bytes(matrix_csv(feats))
    with pytest.raises(DataError, match=r"labels is missing"):
        load_dataset("texas", tmp_path)


def test_texas_label_out_of_range_names_labels_file_and_line(tmp_path: Path) -> None:
    labels, feats = _texas_files(rows=3)
    labels[2] = 101
    (tmp_path / "feats").write_bytes(matrix_csv(feats))
    (tmp_path / "labels").write_bytes(matrix_csv(labels[:, None]))
    with pytest.raises(DataError, match=r"labels line 3: label 101 is not an integer in 1..100"):
        load_dataset("texas", tmp_path)


def test_texas_archive_without_members(tmp_path: Path) -> None:
    write_tgz(tmp_path / "dataset_texas.tgz", {"readme.txt": b"nothing here\n"})
    with pytest.raises(DataError, match=r"dataset_texas.tgz holds no texas/100/feats or texas/100/labels"):
        load_dataset("texas", tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda lines: lines.__setitem__(2, lines[2].rsplit(",", 1)[0]), r"bangkok line 3: expected 447 .* found 446"),
        (lambda lines: lines.__setitem__(1, lines[1] + ",0"), r"bangkok line 2: expected 447 .* found 448"),
        (lambda lines: lines.__setitem__(3, lines[3].replace(",1,", ",x,", 1)),
         r"bangkok line 4, column \d+: 'x' is not a finite number"),
        (lambda lines: lines.__setitem__(0, '"0"' + lines[0][lines[0].index(","):]),
         r"bangkok line 1: label 0 is not an integer in 1..30"),
        (lambda lines: lines.__setitem__(4, '"31"' + lines[4][lines[4].index(","):]),
         r"bangkok line 5: label 31 is not an integer in 1..30"),
        (lambda lines: lines.__setitem__(4, '"2.5"' + lines[4][lines[4].index(","):]),
         r"bangkok line 5: label 2.5 is not an integer"),
        (lambda lines: lines.__setitem__(5, lines[5].replace(",", ",,", 1)), r"bangkok line 6: expected 447"),
    ],
    ids=["too_few_columns", "too_many_columns", "non_numeric", "label_zero", "label_above_k", "label_fraction",
         "empty_cell"],
)
def test_malformed_location_rows(tmp_path: Path, mutate, message: str) -> None:
    labels, feats = _location_rows(8)
    lines = labelled_csv(labels, feats, quote=True).decode().splitlines()
    mutate(lines)
    write_tgz(tmp_path / "dataset_location.tgz", {"bangkok": ("\n".join(lines) + "\n").encode()})
    with pytest.raises(DataError, match=message) as err:
        load_dataset("location", tmp_path)
    assert "dataset_location.tgz:bangkok" in str(err.value) and "\n" not in str(err.value)


def test_purchase_label_above_k_in_plain_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    (tmp_path / "dataset_purchase").write_bytes(labelled_csv(np.array([5, 101]), random_binary(rng, 2, 600)))
    with pytest.raises(DataError, match=r"dataset_purchase line 2: label 101 is not an integer in 1..100"):
        load_dataset("purchase", tmp_path)


@pytest.mark.parametrize(("name", "expected"), [
    ("purchase", "'dataset_purchase' or 'dataset_purchase.tgz'"),
    ("texas", "texas/100/feats and texas/100/labels"),
    ("location", "'bangkok' or 'dataset_location.tgz'"),
])
def test_empty_dir_names_expected_files_and_source(tmp_path: Path, name: str, expected: str) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(name, tmp_path)
    assert expected in str(err.value) and PRIVACYTRUSTLAB in str(err.value)


def test_archive_without_expected_member(tmp_path: Path) -> None:
    write_tgz(tmp_path / "dataset_purchase.tgz", {"something_else": b"1,0\n"})
    with pytest.raises(DataError, match=r"dataset_purchase.tgz holds no file named 'dataset_purchase'"):
        load_dataset("purchase", tmp_path)


def test_corrupt_archive(tmp_path: Path) -> None:
    (tmp_path / "dataset_location.tgz").write_bytes(b"\x1f\x8b\x08\x00garbage" * 10)
    with pytest.raises(DataError, match=r"cannot read .*dataset_location.tgz"):
        load_dataset("location", tmp_path)


def test_truncated_archive(tmp_path: Path) -> None:
    labels, feats = _location_rows(200)
    archive = write_tgz(tmp_path / "dataset_location.tgz", {"bangkok": labelled_csv(labels, feats, quote=True)})
    archive.write_bytes(archive.read_bytes()[:3000])
    with pytest.raises(DataError, match=r"dataset_location.tgz"):
        load_dataset("location", tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "bangkok").write_bytes(b"")
    with pytest.raises(DataError, match=r"bangkok holds no data rows"):
        load_dataset("location", tmp_path)

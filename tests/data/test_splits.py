"""The six-way seeded, stratified split and its file format."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from mexit.data import PARTS, Splits, make_splits
from mexit.data.splits import MIN_VAL_PER_SPLIT, check_disjoint, class_skewed, label_shift
from mexit.errors import ConfigError, DataError
from tests.data._factories import SHARED_DATA

MAIN = ("target_train", "target_test", "shadow_train", "shadow_test")


def _labels(n_per_class: int = 100, classes: int = 10) -> np.ndarray:
    return np.random.default_rng(5).permutation(np.repeat(np.arange(classes), n_per_class))


def _assert_disjoint(s: Splits) -> None:
    for a, b in itertools.combinations(PARTS, 2):
        assert not np.intersect1d(getattr(s, a), getattr(s, b)).size, (a, b)


def test_six_disjoint_parts_cover_everything() -> None:
    y = _labels()
    s = make_splits(y, seed=0)
    _assert_disjoint(s)
    everything = np.sort(np.concatenate(list(s.as_dict().values())))
    np.testing.assert_array_equal(everything, np.arange(len(y)))
    assert s.sizes() == {"target_train": 225, "target_val": 50, "target_test": 225, "shadow_train": 225,
                         "shadow_val": 50, "shadow_test": 225}
    assert all(getattr(s, p).dtype == np.int64 for p in PARTS) and s.seed == 0


def test_sizes_with_uneven_counts() -> None:
    s = make_splits(np.arange(1003) % 7, seed=1, val_fraction=0.15)
    sizes = s.sizes()
    assert sizes["target_val"] == sizes["shadow_val"] == 75
    main = [sizes[p] for p in MAIN]
    assert sum(main) == 1003 - 150 and max(main) - min(main) <= 1
    _assert_disjoint(s)


def test_each_part_is_stratified() -> None:
    y = _labels(n_per_class=200, classes=5)
    s = make_splits(y, seed=3)
    for name in MAIN:
        counts = np.bincount(y[getattr(s, name)], minlength=5)
        assert counts.max() - counts.min() <= 2, (name, counts)
    for name in ("target_val", "shadow_val"):
        counts = np.bincount(y[getattr(s, name)], minlength=5)
        assert counts.max() - counts.min() <= 2, (name, counts)


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    y = _labels()
    a, b, c = make_splits(y, seed=7), make_splits(y, seed=7), make_splits(y, seed=8)
    assert a == b
    assert a != c
    assert not np.array_equal(np.sort(a.target_train), np.sort(c.target_train))


def test_parts_are_shuffled_so_prefixes_are_random() -> None:
    y = np.repeat(np.arange(4), 250)  # labels sorted by class
    s = make_splits(y, seed=0)
    assert len(np.unique(y[s.target_train[:40]])) == 4
    assert not np.all(np.diff(s.target_train) > 0)


def test_cap_respected_and_still_stratified() -> None:
    y = _labels(n_per_class=300, classes=10)
    s = make_splits(y, seed=2, max_per_split=100)
    sizes = s.sizes()
    assert all(sizes[p] == 100 for p in MAIN)
    assert sizes["target_val"] == sizes["shadow_val"] == MIN_VAL_PER_SPLIT
    _assert_disjoint(s)
    for name in MAIN:
        assert np.bincount(y[getattr(s, name)], minlength=10).tolist() == [10] * 10
    big = make_splits(y, seed=2, max_per_split=800)
    assert big.sizes()["target_val"] == 150 and big.sizes()["target_train"] == 675  # caps above the part sizes


def test_rare_classes_do_not_crash() -> None:
    y = np.concatenate([np.zeros(100, int), [1], [2, 2], [3, 3, 3]])
    s = make_splits(y, seed=0)
    _assert_disjoint(s)
    assert sum(s.sizes().values()) == len(y)
    for cls in (1, 2, 3):
        holders = [p for p in PARTS if np.any(y[getattr(s, p)] == cls)]
        assert len(holders) == (y == cls).sum()  # each rare sample lands in a different part


def test_zero_validation_fraction() -> None:
    s = make_splits(np.arange(40) % 2, seed=0, val_fraction=0.0)
    assert s.sizes()["target_val"] == 0 and s.sizes()["shadow_val"] == 0 and s.sizes()["target_train"] == 10


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"labels": np.arange(3), "seed": 0}, "cannot split 3 samples"),
    ({"labels": np.arange(100), "seed": 0, "val_fraction": 1.0}, "val_fraction"),
    ({"labels": np.arange(100), "seed": 0, "max_per_split": 0}, "max_per_split"),
    ({"labels": np.zeros((10, 2), int), "seed": 0}, "1-D integer"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_splits(**kwargs)


def test_save_load_round_trip(tmp_path: Path) -> None:
    s = make_splits(_labels(), seed=11, max_per_split=150)
    path = tmp_path / "run" / "splits.npz"
    s.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["splits.npz"]  # no temp file left behind
    loaded = Splits.load(path)
    assert loaded == s and loaded.seed == 11 and loaded.sizes() == s.sizes()
    with pytest.raises(ValueError):
        loaded.target_train[0] = 1  # read-only


def test_load_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"splits file .*nope.npz does not exist"):
        Splits.load(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"cannot read splits file .*bad.npz"):
        Splits.load(bad)
    good = tmp_path / "good.npz"
    make_splits(_labels(), seed=0).save(good)
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match=r"good.npz"):
        Splits.load(good)


def test_load_rejects_overlapping_parts(tmp_path: Path) -> None:
    s = make_splits(_labels(), seed=0)
    arrays = s.as_dict()
    arrays["target_test"] = np.concatenate([arrays["target_test"], arrays["target_train"][:1]])
    Splits(**arrays, seed=0).save(tmp_path / "overlap.npz")
    with pytest.raises(DataError, match="overlap"):
        Splits.load(tmp_path / "overlap.npz")


def test_check_fits() -> None:
    s = make_splits(_labels(), seed=0)
    s.check_fits(1000)
    with pytest.raises(DataError, match="has only 500"):
        s.check_fits(500)


def test_stratified_on_real_cifar10_labels() -> None:
    path = SHARED_DATA / "cifar-10-batches-py"
    if not (path / "data_batch_1").is_file():
        pytest.skip(f"real CIFAR-10 files not found at {path}")
    import pickle

    labels = []
    for name in ("data_batch_1", "test_batch"):
        with open(path / name, "rb") as fh:
            labels += pickle.load(fh, encoding="bytes")[b"labels"]
    y = np.asarray(labels)
    s = make_splits(y, seed=0)
    assert s.sizes()["target_train"] == 4500 and s.sizes()["target_val"] == 1000
    for name in PARTS:
        counts = np.bincount(y[getattr(s, name)], minlength=10)
        expected = len(getattr(s, name)) / 10
        assert np.all(np.abs(counts - expected) <= 1), (name, counts)


def test_check_disjoint_accepts_one_partition_and_names_an_overlap():
    from mexit.data.splits import check_disjoint

    y = np.repeat(np.arange(5), 40)
    a = make_splits(y, seed=1)
    check_disjoint(a, make_splits(y, seed=1))  # same seed: target and shadow halves of one partition
    b = make_splits(y, seed=2)  # another partition: its shadow half overlaps this target half
    with pytest.raises(ConfigError, match=r"overlap: \d+ samples of the target's target_\w+ \(split seed 1\) are in "
                                          r"the shadow's shadow_\w+ \(split seed 2\)") as err:
        check_disjoint(a, b)
    assert "\n" not in str(err.value) and "--seed" in str(err.value)
    with pytest.raises(ConfigError, match="overlap"):
        check_disjoint(a, a, shadow_role="target")  # a run attacked with itself as shadow
    with pytest.raises(ConfigError, match="role"):
        check_disjoint(a, a, shadow_role="attacker")


def test_class_skewed_moves_one_roles_class_prior_and_stays_a_subset():
    rng = np.random.default_rng(0)
    labels = rng.choice(8, size=4000)
    full = make_splits(labels, seed=4)
    shifted = class_skewed(full, labels, "shadow")
    for part in ("target_train", "target_val", "target_test"):  # the other role is untouched
        assert np.array_equal(getattr(shifted, part), getattr(full, part))
    for part in ("shadow_train", "shadow_test"):
        sub, whole = getattr(shifted, part), getattr(full, part)
        assert set(sub) <= set(whole) and len(sub) < len(whole)
        kept = np.bincount(labels[sub], minlength=8) / np.bincount(labels[whole], minlength=8)
        assert np.sum(kept == 1.0) == 4 and np.all(kept[kept < 1] < 0.3)  # half whole, half about a quarter
    assert label_shift(labels, full.shadow_train, full.target_train) < 0.03  # stratified parts: same prior
    assert label_shift(labels, shifted.shadow_train, full.target_train) > 0.25  # the shadow's prior moved
    check_disjoint(full, shifted)  # still the same partition's parts
    assert class_skewed(full, labels, "shadow") == shifted  # seeded by the partition


def test_class_skewed_needs_a_known_role():
    labels = np.arange(200) % 4
    with pytest.raises(ConfigError, match="unknown role"):
        class_skewed(make_splits(labels, seed=0), labels, "attacker")

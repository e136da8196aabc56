"""The reference-set manifest, its checks, and the per-sample reference arrays (no training here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mexit.attacks.reference import (
    ReferenceError,
    ReferenceModel,
    ReferenceSet,
    check_population,
    half_splits,
    logit_confidence,
    probability_from_logit,
    single_reference,
    with_references,
)
from mexit.attacks.signals import Signals


def _set(models: int = 4, pool: int = 40) -> ReferenceSet:
    halves = half_splits(np.arange(pool), models, seed=0)
    return ReferenceSet(dataset="digits", arch="fcn18-1", num_exits=3, num_classes=10, pool=tuple(range(pool)),
                        recipe={"epochs": 1}, recipe_digest="abc",
                        models=tuple(ReferenceModel(name=f"ref-{r}", bundle=f"ref-{r}/bundle",
                                                    train_index=tuple(int(i) for i in h), seed=r)
                                     for r, h in enumerate(halves)))


def test_half_splits_are_balanced_complementary_pairs() -> None:
    halves = half_splits(np.arange(100, 200), 6, seed=3)
    inside = np.stack([np.isin(np.arange(100, 200), h) for h in halves], axis=1)
    assert (inside.sum(axis=1) == 3).all()  # every pooled sample IN for exactly half of 6 models
    assert all(len(h) == 50 for h in halves)
    assert not np.intersect1d(halves[0], halves[1]).size
    assert [h.tolist() for h in half_splits(np.arange(100, 200), 6, seed=3)] == [h.tolist() for h in halves]
    odd = half_splits(np.arange(10), 3, seed=0)
    assert len(odd) == 3
    with pytest.raises(ReferenceError):
        half_splits(np.arange(1), 2, seed=0)


def test_manifest_round_trip_and_in_matrix(tmp_path: Path) -> None:
    refs = _set()
    path = refs.save(tmp_path)
    loaded = ReferenceSet.load(tmp_path)
    assert loaded.to_dict() == refs.to_dict() and loaded.root == tmp_path
    assert loaded.bundle_path(loaded.models[1]) == tmp_path / "ref-1" / "bundle"
    m = loaded.in_matrix(np.array([0, 5, 39, 1000]))
    assert m.shape == (4, 4) and (m[:3].sum(axis=1) == 2).all() and not m[3].any()
    doc = json.loads(path.read_text())
    doc["schema"] = "other/1"
    path.write_text(json.dumps(doc))
    with pytest.raises(ReferenceError, match="not a readable reference-set manifest"):
        ReferenceSet.load(tmp_path)
    with pytest.raises(ReferenceError, match="no reference set"):
        ReferenceSet.load(tmp_path / "missing")


def test_refuses_other_architecture_exits_and_outside_pool() -> None:
    refs = _set()
    refs.check_matches(arch="fcn18-1", num_exits=3, num_classes=10, dataset="digits")
    with pytest.raises(ReferenceError, match="reference models have 3 exits but the target has 6"):
        refs.check_matches(arch="fcn18-1", num_exits=6)
    with pytest.raises(ReferenceError, match="reference models are fcn18-1 but the target is fcn18-2"):
        refs.check_matches(arch="fcn18-2", num_exits=3)
    with pytest.raises(ReferenceError, match="outside the pool"):
        ReferenceSet(dataset="d", arch="a", num_exits=1, num_classes=2, pool=(0, 1), recipe={}, recipe_digest="x",
                     models=(ReferenceModel(name="r", bundle="b", train_index=(0, 7), seed=0),))


def test_population_must_not_overlap_members() -> None:
    check_population(np.arange(10, 20), np.arange(0, 10))
    with pytest.raises(ReferenceError, match="overlaps the target's members in 2 samples"):
        check_population(np.arange(8, 20), np.arange(0, 10))


def test_logit_confidence_and_single_reference() -> None:
    probs = np.array([[0.2, 0.8], [0.5, 0.5]], dtype=np.float32)
    phi = logit_confidence(probs, np.array([1, 0]))
    assert phi == pytest.approx([np.log(4.0), 0.0], abs=1e-6)
    assert probability_from_logit(phi) == pytest.approx([0.8, 0.5], abs=1e-6)
    one = single_reference(probs, np.array([1, 0]), np.array([0, 1]))
    assert one["reference_score"].shape == (2, 1) and not one["reference_in"].any()
    sig = Signals(member=np.array([True, False]), true_label=np.array([1, 0]), pred_label=np.array([1, 0]),
                  sample_index=np.arange(2), num_exits=2, num_classes=2, probs=probs)
    attached = with_references(sig, one)
    assert attached.reference_exit.tolist() == [[0], [1]]
    assert attached.subset(np.array([1])).reference_score.shape == (1, 1)
    with pytest.raises(ReferenceError, match="rows but the signals hold 2"):
        with_references(sig, single_reference(probs[:1], np.array([1]), None))
    with pytest.raises(Exception, match="reference arrays must all be"):
        Signals(member=np.array([True, False]), true_label=np.array([1, 0]), pred_label=np.array([1, 0]),
                sample_index=np.arange(2), num_exits=2, num_classes=2, reference_score=np.zeros((2, 3)),
                reference_in=np.zeros((2, 2), bool))


def test_signals_save_load_keeps_reference_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sig = Signals(member=np.array([True, False, True]), true_label=np.array([1, 0, 1]),
                  pred_label=np.array([1, 0, 0]), sample_index=np.arange(3), num_exits=2, num_classes=2,
                  probs=rng.random((3, 2)).astype(np.float32),
                  reference_score=rng.normal(size=(3, 4)).astype(np.float32),
                  reference_in=rng.random((3, 4)) < 0.5, reference_exit=rng.integers(0, 2, (3, 4)))
    sig.save(tmp_path / "s.npz")
    back = Signals.load(tmp_path / "s.npz")
    for name in ("reference_score", "reference_in", "reference_exit"):
        assert np.array_equal(getattr(back, name), getattr(sig, name))


def test_reference_recorder_single_out_model_per_role() -> None:
    from types import SimpleNamespace

    from mexit.attacks.reference import reference_recorder
    from mexit.runtime.types import Prediction

    class Fixed:
        def predict(self, x: np.ndarray) -> Prediction:
            probs = np.tile(np.array([[0.25, 0.75]], dtype=np.float32), (len(x), 1))
            return Prediction(probs=probs, labels=np.ones(len(x), np.int64), exit_index=np.zeros(len(x), np.int64),
                              latency_ns=np.zeros(len(x), np.int64))

    record = reference_recorder({"target": Fixed()})
    queries = SimpleNamespace(x=np.zeros((3, 2), np.float32), y=np.array([1, 0, 1]), index=np.arange(3))
    arrays, info = record(SimpleNamespace(queries=queries, role="target"))
    assert arrays["reference_score"][:, 0] == pytest.approx([np.log(3), -np.log(3), np.log(3)], abs=1e-5)
    assert not arrays["reference_in"].any() and arrays["reference_exit"].tolist() == [[0], [0], [0]]
    assert info["references"] == 1
    with pytest.raises(ReferenceError, match="no single reference model for the shadow deployment"):
        record(SimpleNamespace(queries=queries, role="shadow"))

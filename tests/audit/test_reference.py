"""Training a reference set through the sweep executors: manifest, resume, cache by configuration, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mexit.attacks.reference import ReferenceSet, reference_signals
from mexit.audit.reference import recipe_of, train_references
from mexit.data import load_dataset
from mexit.errors import UserError

RECIPE = {"epochs": 1, "lr": 1e-3, "batch_size": 64, "optimizer": "adam", "weighting": "sum"}


def _train(out: Path, **kw: object) -> ReferenceSet:
    args: dict[str, object] = {"dataset": "digits", "arch": "fcn18-1", "exits": 3, "pool": np.arange(120),
                               "n_models": 2, "out_dir": out, "threshold": 0.5, "recipe": RECIPE, "seed": 0,
                               "exporter": "legacy", "threads": 1}
    args.update(kw)
    return train_references(**args)  # type: ignore[arg-type]


def test_train_query_resume_and_cache(tmp_path: Path) -> None:
    out = tmp_path / "refs"
    refs = _train(out)
    assert len(refs) == 2 and refs.num_exits == 3 and refs.num_classes == 10
    assert (out / "reference_set.json").is_file()
    ins = refs.in_matrix(np.arange(120))
    assert (ins.sum(axis=1) == 1).all()  # two complementary halves
    assert all("final_exit_train_accuracy" in m.metrics for m in refs.models)
    ds = load_dataset("digits")
    idx = np.array([0, 1, 2, 150])
    arrays = reference_signals(ReferenceSet.load(out), ds.inputs(idx), ds.y[idx], idx)
    assert arrays["reference_score"].shape == (4, 2) and arrays["reference_exit"].max() <= 2
    assert not arrays["reference_in"][3].any()  # sample 150 is outside the pool
    assert np.isfinite(arrays["reference_score"]).all()

    # a complete set is returned from the cache; a model that lost its done.json is retrained alone (resume)
    stamp = (out / "ref-000" / "done.json").stat().st_mtime_ns
    (out / "reference_set.json").unlink()
    (out / "ref-001" / "done.json").unlink()
    again = _train(out)
    assert (out / "ref-000" / "done.json").stat().st_mtime_ns == stamp
    assert (out / "ref-001" / "done.json").is_file()
    def same(d: dict) -> dict:  # training time differs; the retrained model itself is deterministic
        return {**d, "models": [{**m, "metrics": {k: v for k, v in m["metrics"].items() if k != "seconds"}}
                                for m in d["models"]]}

    assert same(again.to_dict()) == same(refs.to_dict())

    # another configuration in the same directory is refused, in one line
    with pytest.raises(UserError, match="holds a reference set of another configuration"):
        _train(out, n_models=3)


def test_failure_keeps_nothing_half_written(tmp_path: Path) -> None:
    out = tmp_path / "bad"
    with pytest.raises(UserError, match=r"1 of 1 reference models failed .*exits must be an integer"):
        _train(out, exits=7, n_models=1)
    assert not (out / "reference_set.json").exists()
    assert json.loads((out / "reference_digest.json").read_text())["identity"]["exits"] == 7


def test_recipe_of_train_config_and_bad_recipe(tmp_path: Path) -> None:
    from mexit.train.runner import make_config

    cfg = make_config(dataset="digits", arch="fcn18-1", exits=3, epochs=4, batch_size=32)
    assert recipe_of(cfg) == {"epochs": 4, "lr": 1e-3, "batch_size": 32, "optimizer": "adam", "weighting": "sum"}
    with pytest.raises(UserError, match="recipe lacks"):
        _train(tmp_path / "r", recipe={"epochs": 1})

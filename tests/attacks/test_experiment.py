"""``run_experiment`` end to end on in-process toy deployments: every section, resume, label-only."""

import json

import numpy as np
import pytest

from mexit.attacks import experiment
from mexit.attacks.experiment import AttackSettings, QuerySet, run_experiment
from mexit.errors import ConfigError
from mexit.serve import LocalClient
from mexit.serve.testing import ToyRuntime


def _queries(seed: int, n: int = 40) -> QuerySet:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, (2 * n, 16)).astype(np.float32)  # binary rows: the tabular label-only attack flips bits
    return QuerySet(x, rng.integers(0, 4, 2 * n), np.r_[np.ones(n, bool), np.zeros(n, bool)], np.arange(2 * n))


@pytest.fixture
def deployments():
    target, shadow = ToyRuntime(seed=1), ToyRuntime(seed=2)
    return (LocalClient(target), target), (LocalClient(shadow), shadow)


def test_results_hold_every_section(tmp_path, deployments):
    (tc, trt), (sc, srt) = deployments
    settings = AttackSettings(attacks=["loss", "loss-hybrid", "exit-only", "label-only"], repeats=2, warmup=2,
                              bootstrap=50, label_only_queries=20)
    res = run_experiment(tc, sc, _queries(0), _queries(1), settings, tmp_path, target_runtime=trt,
                         shadow_runtime=srt, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["schema"] == "mexit.attack/1"
    for key in ("exit_stealing", "leakage", "adversaries", "label_only", "provenance", "settings"):
        assert key in saved, key
    assert set(res["adversaries"]) == {"1", "2"}
    assert "accuracy" in res["exit_stealing"]["supervised"]
    assert len(saved["leakage"]["members_per_exit"]) == trt.num_exits
    for adv in res["adversaries"].values():
        for name in settings.attacks:
            assert 0.0 <= adv["attacks"][name]["auc"]["value"] <= 1.0
    assert res["adversaries"]["2"]["exit_source"].startswith("stolen")
    assert res["adversaries"]["1"]["exit_source"] == "exposed"


def test_rerun_reuses_collected_signals(tmp_path, deployments, monkeypatch):
    (tc, trt), (sc, srt) = deployments
    settings = AttackSettings(attacks=["loss"], repeats=2, warmup=1, bootstrap=20)
    run_experiment(tc, sc, _queries(0), _queries(1), settings, tmp_path, target_runtime=trt, shadow_runtime=srt,
                   progress=False)
    monkeypatch.setattr(experiment, "collect_signals", lambda *a, **k: pytest.fail("signals must be reused"))
    run_experiment(tc, sc, _queries(0), _queries(1), settings, tmp_path, target_runtime=trt, shadow_runtime=srt,
                   progress=False)


def test_too_few_samples_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 10"):
        QuerySet.from_split(lambda idx: np.zeros((len(idx), 2), np.float32), np.zeros(20, np.int64),
                            np.arange(5), np.arange(5, 20), 100, 0)

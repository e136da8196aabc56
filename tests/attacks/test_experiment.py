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


def test_adversary_three_uses_its_own_shadow_and_the_blind_kde(tmp_path, deployments):
    (tc, trt), (sc, srt) = deployments
    other = ToyRuntime(seed=3)  # stands in for another architecture
    settings = AttackSettings(attacks=["loss", "loss-hybrid", "label-only"], adversaries=[2, 3], repeats=2, warmup=1,
                              bootstrap=20, label_only_queries=10)
    res = run_experiment(tc, sc, _queries(0), _queries(1), settings, tmp_path, target_runtime=trt, shadow_runtime=srt,
                         shadow3_client=LocalClient(other), shadow3_queries=_queries(2), shadow3_runtime=other,
                         progress=False)
    assert set(res["adversaries"]) == {"2", "3"} and res["samples"]["shadow3"] == 80
    assert res["adversaries"]["3"]["exit_source"] == "stolen-kde-blind"
    assert "error" not in res["adversaries"]["3"]["attacks"]["label-only"]  # its shadow got label-only scores too
    assert (tmp_path / "signals_shadow3.npz").exists() and (tmp_path / "label_only_scores_shadow3.npz").exists()
    assert {"kde", "kde_blind", "supervised"} <= set(res["exit_stealing"])
    with pytest.raises(ConfigError, match="adversary 3"):
        run_experiment(tc, sc, _queries(0), _queries(1), settings, tmp_path / "x", target_runtime=trt,
                       shadow_runtime=srt, progress=False)


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

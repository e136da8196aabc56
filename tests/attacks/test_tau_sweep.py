"""The τ sweep on a numpy stand-in for the early-exit runtime: exits, cost, accuracy and leakage per τ."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mexit.attacks.tau_sweep import plot_tau_sweep, runtime_signals, summarize_leakage, tau_sweep
from mexit.errors import ConfigError, InputError
from mexit.runtime.types import Prediction

CLASSES = 4


class TableRuntime:
    """An early-exit model whose per-exit probabilities are a lookup table keyed by the first input column.

    Exit k's confidence for a member is high at every exit (memorised), a non-member's grows with depth,
    so members leave early — the paper's mechanism — and a low τ sends everyone out at exit 0.
    """

    def __init__(self, table: list[np.ndarray], tau: float) -> None:
        self.table, self.tau = table, tau
        self.num_exits, self.num_classes = len(table), table[0].shape[1]
        self.exit_costs = [10 * (k + 1) for k in range(self.num_exits)]

    def predict(self, x: np.ndarray, *, full_depth: bool = False) -> Prediction:
        rows = x[:, 0].astype(int)
        probs = [t[rows] for t in self.table]
        if full_depth:
            exits = np.full(len(rows), self.num_exits - 1)
        else:
            conf = np.stack([p.max(1) for p in probs[:-1]], axis=1) >= self.tau
            exits = np.where(conf.any(1), conf.argmax(1), self.num_exits - 1)
        out = np.stack([probs[e][i] for i, e in enumerate(exits)]).astype(np.float32)
        return Prediction(out, out.argmax(1), exits.astype(np.int64), np.zeros(len(rows), np.int64))


def _world(seed: int, n: int = 120, exits: int = 3) -> tuple[list[np.ndarray], tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(seed)
    member = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    y = rng.integers(0, CLASSES, n)
    table = []
    for k in range(exits):
        conf = np.where(member, rng.uniform(0.85, 0.99, n), rng.uniform(0.3, 0.6 + 0.15 * k, n))
        wrong = ~member & (rng.random(n) < 0.4)  # non-members are often misclassified
        top = np.where(wrong, (y + 1) % CLASSES, y)
        p = np.tile(((1 - conf) / (CLASSES - 1))[:, None], (1, CLASSES))
        p[np.arange(n), top] = conf
        table.append(p)
    x = np.arange(n, dtype=np.float32)[:, None]
    return table, (x, y, member)


def _sweep(**kwargs):
    t_table, tq = _world(1)
    s_table, sq = _world(2)
    return tau_sweep(lambda t: TableRuntime(t_table, t), lambda t: TableRuntime(s_table, t), tq, sq, **kwargs)


def test_sweep_records_exits_cost_accuracy_and_leakage_per_tau():
    res = _sweep(grid=[0.0, 0.5, 0.9, 1.0], deployed_tau=0.5)
    assert [r["tau"] for r in res["rows"]] == [0.0, 0.5, 0.9, 1.0]
    low, high = res["rows"][0], res["rows"][-1]
    # τ = 0: everyone leaves at exit 0 (cost 10 of 30); τ = 1: nobody is confident enough, all at the final exit
    assert low["exit_shares_members"][0] == 1.0 and low["mean_flops_fraction"] == pytest.approx(1 / 3)
    assert high["exit_shares_nonmembers"][-1] == 1.0 and high["mean_flops_fraction"] == pytest.approx(1.0)
    mid = res["rows"][1]
    # members (confidence ≥ 0.85) leave at exit 0 at τ = 0.5, non-members spread deeper
    assert mid["exit_shares_members"][0] == 1.0 and mid["exit_shares_nonmembers"][0] < 0.8
    assert mid["exit_only_auc"] > 0.6
    assert mid["accuracy_members"] == 1.0 and mid["accuracy_nonmembers"] < 0.8
    for r in res["rows"]:
        assert 0.5 < r["best_original_auc"] <= 1.0
    # a single exit in use: hybrid attacks carry no exit information and are left out, not faked
    assert low["attacks"]["score-hybrid"] is None and low["best_hybrid_auc"] is None
    assert mid["best_hybrid_auc"] is not None
    assert res["reference"]["full_depth"]["best_original_auc"] > 0.5
    json.dumps(res)  # JSON-able


def test_leakage_follows_the_data_not_a_constant():
    """Swapping membership labels on the target turns the attacks below chance."""
    t_table, (x, y, m) = _world(1)
    s_table, sq = _world(2)
    res = tau_sweep(lambda t: TableRuntime(t_table, t), lambda t: TableRuntime(s_table, t), (x, y, ~m), sq,
                    grid=[0.5])
    assert res["rows"][0]["attacks"]["score"]["auc"] < 0.3


def test_vanilla_reference_line_uses_the_given_models():
    t_table, tq = _world(1)
    s_table, sq = _world(2)
    uninformative = [np.full_like(t_table[0], 1 / CLASSES)]  # a vanilla model that leaks nothing
    res = tau_sweep(lambda t: TableRuntime(t_table, t), lambda t: TableRuntime(s_table, t), tq, sq, grid=[0.5],
                    vanilla=(TableRuntime(uninformative, 1.0), TableRuntime(uninformative, 1.0)))
    assert res["reference"]["vanilla"]["best_original_auc"] == pytest.approx(0.5, abs=0.1)
    assert res["rows"][0]["best_original_auc"] > 0.8


def test_bad_input_is_refused():
    t_table, tq = _world(1)
    make = lambda t: TableRuntime(t_table, t)  # noqa: E731
    with pytest.raises(ConfigError, match="unknown attack"):
        tau_sweep(make, make, tq, tq, attacks=["nope"])
    with pytest.raises(ConfigError, match="label-only"):
        tau_sweep(make, make, tq, tq, attacks=["label-only"])
    with pytest.raises(ConfigError, match="grid"):
        tau_sweep(make, make, tq, tq, grid=[1.5])
    x, y, m = tq
    with pytest.raises(InputError, match="members and non-members"):
        tau_sweep(make, make, (x, y, np.ones_like(m)), tq, grid=[0.5])
    with pytest.raises(InputError, match="one row per sample"):
        runtime_signals(make(0.5), x, y[:-1], m)


def test_summary_ignores_missing_attacks():
    leak = {"score": {"auc": 0.7, "balanced_accuracy": 0.66}, "loss": {"auc": 0.8, "balanced_accuracy": 0.6},
            "score-hybrid": None, "loss-hybrid": {"auc": 0.9, "balanced_accuracy": 0.7},
            "exit-only": {"auc": 0.95, "balanced_accuracy": 0.9}}
    assert summarize_leakage(leak) == {"best_original_auc": 0.8, "best_hybrid_auc": 0.9, "best_original_asr": 0.66,
                                       "best_hybrid_asr": 0.7, "exit_only_auc": 0.95}


def test_plot_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    res = _sweep(grid=[0.2, 0.6, 1.0], deployed_tau=0.6)
    fig = plot_tau_sweep(res, tmp_path / "sweep.png", title="toy")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert len(fig.axes) == 2

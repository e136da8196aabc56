"""The TimeGuard frontier on synthetic recordings: stealing falls with σ, and the recommendation's flags."""

from __future__ import annotations

import numpy as np

from mexit.attacks.signals import Signals
from mexit.audit.defense_eval import stealing_accuracy, timeguard_frontier


def _signals(seed: int, exits: np.ndarray, gap_ms: float) -> tuple[Signals, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = len(exits)
    lat_ms = 1.0 + gap_ms * exits[:, None] + rng.normal(0, 0.02, (n, 5)).clip(-0.05, 0.05)
    x = rng.integers(0, 2, (n, 12)).astype(np.float32)
    sig = Signals(member=np.arange(n) % 2 == 0, true_label=np.zeros(n, np.int64), pred_label=np.zeros(n, np.int64),
                  sample_index=np.arange(n), num_exits=4, num_classes=2, true_exit=exits,
                  latency_ns=(lat_ms * 1e6).astype(np.int64))
    return sig, x


def _frontier(exits_t: np.ndarray, exits_s: np.ndarray, gap_ms: float) -> dict:
    target, xt = _signals(0, exits_t, gap_ms)
    shadow, xs = _signals(1, exits_s, gap_ms)
    return timeguard_frontier(target=target, shadow=shadow, x_target=xt, x_shadow=xs, kind="tabular",
                              key=b"k" * 32, shadow_key=b"s" * 32, sigmas_ms=[0.05, 5.0, 20.0], stealer="supervised",
                              hybrid_attacks={}, best_original_balanced_accuracy=None, stealing_tolerance=0.1,
                              attack_tolerance=None, seed=0)


def test_timing_leak_needs_a_large_sigma() -> None:
    exits = np.tile(np.arange(4), 60)
    res = _frontier(exits, exits.copy(), gap_ms=0.5)
    assert stealing_accuracy(res["baseline"]) > 0.95 and res["chance"] == 0.25
    assert stealing_accuracy(res["grid"][0]) > 0.9  # 0.05 ms hides nothing of 0.5 ms gaps
    rec = res["recommended"]
    assert rec["needed"] and rec["met"] and rec["sigma_ms"] in (5.0, 20.0)
    assert stealing_accuracy(rec["row"]) <= res["chance"] + 0.1
    assert res["padding"]["kde_blind_accuracy"] <= res["chance"] + 0.1
    assert 5.0 not in res["easier_than_undefended_sigmas_ms"]


def test_no_leak_means_no_defense_is_needed() -> None:
    exits = np.full(200, 3)  # every sample leaves at the last exit: nothing to steal
    res = _frontier(exits, exits.copy(), gap_ms=0.5)
    assert res["chance"] == 1.0
    assert res["recommended"]["needed"] is False and res["recommended"]["sigma_ms"] == 0.05

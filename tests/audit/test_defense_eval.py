"""The defense frontier on synthetic recordings: every defense against the oracle, the Bayes bound and the hybrid
gain; the recommendation; live confirmation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mexit.attacks.signals import Signals
from mexit.audit.defense_eval import (
    evaluate_defenses,
    exit_ranking_auc,
    exit_ranking_auc_ci,
    live_defense_confirmation,
    membership_gain,
)
from mexit.defense import parse_defense


# ------------------------------------------------------------------------- the issue-12 defense frontier
class _ExitAttack:
    """A 'hybrid attack' whose score is the exit it is shown: members leave at exit 0 more often here."""

    def score(self, view: Signals) -> np.ndarray:
        return (np.asarray(view.exit_index) == 0).astype(float)


def _leaky_pair(seed: int, n: int = 240) -> tuple[Signals, np.ndarray]:
    rng = np.random.default_rng(seed)
    member = np.arange(n) % 2 == 0
    exits = np.where(member, rng.choice(4, n, p=[0.7, 0.1, 0.1, 0.1]), rng.choice(4, n, p=[0.1, 0.1, 0.1, 0.7]))
    lat_ms = 1.0 + 0.5 * exits[:, None] + rng.normal(0, 0.02, (n, 5)).clip(-0.05, 0.05)
    sig = Signals(member=member, true_label=np.zeros(n, np.int64), pred_label=np.zeros(n, np.int64),
                  sample_index=np.arange(n), num_exits=4, num_classes=2, true_exit=exits,
                  latency_ns=(lat_ms * 1e6).astype(np.int64))
    return sig, rng.integers(0, 2, (n, 12)).astype(np.float32)


def test_defense_frontier_judges_every_policy_against_the_strongest_stealer() -> None:
    target, xt = _leaky_pair(0)
    shadow, xs = _leaky_pair(1)
    originals = {"blind": np.random.default_rng(5).random(len(target.member))}  # an original attack at chance
    defenses = [parse_defense("timeguard", {"sigma_ms": 0.05}), parse_defense("padding"),
                parse_defense("optimal", {"epsilon": 0.0}), parse_defense("optimal", {"epsilon": 0.1}),
                parse_defense("optimal", {"epsilon": 0.74})]
    res = evaluate_defenses(target=target, shadow=shadow, x_target=xt, x_shadow=xs, kind="tabular", key=b"k" * 32,
                            shadow_key=b"s" * 32, defenses=defenses, hybrid_attacks={"exit": _ExitAttack()},
                            original_scores=originals, seed=0, n_bootstrap=100, oracle_folds=3)
    json.dumps(res)
    rows = {r["label"]: r for r in res["rows"]}
    assert res["chance_balanced"] == 0.25 and res["skipped"] == []
    none, pad = rows["none"], rows["padding(quantile=0.999, margin_ms=0)"]
    # Undefended: every judge sees the exits, and the exit-based hybrid beats the blind original.
    assert none["bayes_bound"] > 0.95 and none["oracle_balanced_accuracy"] > 0.9 and none["exit_ranking_auc"] > 0.95
    assert none["hybrid_gain"]["value"] > 0.2 and none["hybrid_gain"]["ci"][0] > 0 and not none["meets"]
    # Padding hides the exit from all of them, at a cost.
    assert pad["bayes_bound"] == pytest.approx(0.25, abs=0.01) and pad["oracle_balanced_accuracy"] <= 0.3
    assert pad["exit_ranking_auc"] <= 0.55 and pad["meets"] and pad["mean_added_ms"] > 0.5
    # The optimal schedule at eps = 0 is padding; its bound grows with epsilon and its cost falls.
    opt0 = rows["optimal(epsilon=0, quantile=0.999, margin_ms=0, grid=128)"]
    opt1 = rows["optimal(epsilon=0.1, quantile=0.999, margin_ms=0, grid=128)"]
    assert opt0["mean_added_ms"] == pytest.approx(pad["mean_added_ms"], rel=1e-6)
    assert opt1["bayes_bound"] <= 0.35 + 0.01 and opt1["mean_added_ms"] < opt0["mean_added_ms"]
    # A tiny sigma hides nothing.
    assert rows["timeguard(sigma_ms=0.05)"]["oracle_balanced_accuracy"] > 0.9
    rec = res["recommended"]
    assert rec is not None and rec["needed"] and rows[rec["label"]]["meets"]
    cheapest = min((r for r in res["rows"] if r["meets"]), key=lambda r: r["mean_added_ms"])
    assert rec["label"] == cheapest["label"] and "wins" in res["verdict"]
    assert pad["supervised_accuracy"] <= 0.8  # plain accuracies are kept beside the balanced ones


def test_defense_frontier_skips_what_cannot_be_built() -> None:
    target, xt = _leaky_pair(0, 120)
    res = evaluate_defenses(target=target, shadow=target, x_target=xt, x_shadow=xt, kind="tabular", key=b"k" * 32,
                            shadow_key=b"s" * 32, defenses=[parse_defense("optimal", {"epsilon": 0.9})],
                            seed=0, n_bootstrap=0, oracle_folds=2)
    assert [r["label"] for r in res["rows"]] == ["none"]
    assert "epsilon must lie in [0, 0.75]" in res["skipped"][0]["reason"]
    assert res["rows"][0]["hybrid_gain"] is None


def test_membership_gain_and_ranking_auc() -> None:
    member = np.arange(200) % 2 == 0
    perfect = member.astype(float)
    noise = np.random.default_rng(0).random(200)
    gain = membership_gain({"h": perfect}, {"o": noise}, member, n_bootstrap=200, seed=0)
    assert gain is not None and gain["value"] > 0.3 and gain["ci"][0] > 0.2
    same = membership_gain({"h": noise}, {"o": noise}, member, n_bootstrap=200, seed=0)
    assert same is not None and same["value"] == 0 and same["ci"] == [0.0, 0.0]
    assert membership_gain({}, {"o": noise}, member) is None
    exits = np.repeat([0, 1, 2], 50)
    assert exit_ranking_auc(exits.astype(float), exits) == 1.0
    assert exit_ranking_auc(np.ones(150), exits) == 0.5
    assert exit_ranking_auc(np.ones(10), np.zeros(10, dtype=np.int64)) is None


def test_live_defense_confirmation_judges_a_guarded_recording() -> None:
    target, _ = _leaky_pair(0)
    shadow, xs = _leaky_pair(1)
    # "Live" recording of padding: every answer at 3 ms, whatever the exit.
    live = Signals(**{**{f: getattr(target, f) for f in ("member", "true_label", "pred_label", "sample_index",
                                                          "num_exits", "num_classes", "true_exit")},
                      "latency_ns": np.full_like(target.latency_ns, 3_000_000)})
    res = live_defense_confirmation(live=live, baseline=target, shadow=shadow, x_shadow=xs, kind="tabular",
                                    shadow_key=b"s" * 32, config=parse_defense("padding"), stealer="supervised",
                                    hybrid_attacks={"exit": _ExitAttack()},
                                    original_scores={"o": np.random.default_rng(0).random(len(target.member))},
                                    seed=0, n_bootstrap=50)
    json.dumps(res)
    assert res["exit_ranking_auc"] == 0.5 and res["oracle_balanced_accuracy"] <= 0.3
    assert res["mean_added_ms"] > 0.5 and res["label"] == "padding(quantile=0.999, margin_ms=0)"


def test_exit_ranking_auc_interval_covers_its_value_and_excludes_chance_only_for_a_real_order():
    rng = np.random.default_rng(0)
    exits = rng.integers(0, 4, 600)
    ordered = exits + rng.normal(0, 1.5, 600)  # deeper exits somewhat later
    lo, hi = exit_ranking_auc_ci(ordered, exits, n_bootstrap=200)
    assert lo <= exit_ranking_auc(ordered, exits) <= hi and lo > 0.5
    lo, hi = exit_ranking_auc_ci(rng.normal(size=600), exits, n_bootstrap=200)
    assert lo < 0.5 < hi
    assert exit_ranking_auc_ci(ordered, np.zeros(600, dtype=int)) is None
    assert exit_ranking_auc_ci(ordered, exits, n_bootstrap=0) is None

"""The attack flow end to end on in-process toy deployments: sections, resume, recorders, adversaries' views."""

import json

import numpy as np
import pytest

from mexit.attacks import flow
from mexit.attacks.flow import AttackPlan, LabelOnlyOptions, QuerySet, Side, run_attack_flow
from mexit.attacks.mia import get_attack, signals_needed
from mexit.attacks.signals import Signals
from mexit.errors import ConfigError
from mexit.serve import LocalClient
from mexit.serve.testing import ToyRuntime


def _queries(seed: int, n: int = 40) -> QuerySet:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2, (2 * n, 16)).astype(np.float32)  # binary rows: the tabular label-only attack flips bits
    return QuerySet(x, rng.integers(0, 4, 2 * n), np.r_[np.ones(n, bool), np.zeros(n, bool)], np.arange(2 * n))


def _side(seed: int, qseed: int) -> Side:
    rt = ToyRuntime(seed=seed)
    return Side(LocalClient(rt), _queries(qseed), rt)


def _plan(attacks: list[str], **kw) -> AttackPlan:
    kw.setdefault("repeats", 2)
    kw.setdefault("warmup", 1)
    kw.setdefault("bootstrap", 20)
    return AttackPlan(attacks=attacks, label_only=LabelOnlyOptions(kind="tabular", n_noisy=10), **kw)


def test_results_hold_every_section(tmp_path):
    plan = _plan(["loss", "loss-hybrid", "exit-only", "label-only"])
    res = run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["schema"] == flow.RESULTS_SCHEMA
    for key in ("exit_stealing", "leakage", "adversaries", "calibration", "provenance", "plan"):
        assert key in saved, key
    assert set(res["adversaries"]) == {"1", "2"}
    steal = res["exit_stealing"]
    for name in ("kde", "kde-blind", "supervised"):
        entry = steal["stealers"][name]
        assert {"accuracy", "chance", "balanced_accuracy", "balanced_chance", "per_exit_recall"} <= set(entry)
    assert len(saved["leakage"]["members_per_exit"]) == ToyRuntime(seed=1).num_exits
    assert res["adversaries"]["2"]["exit_source"].startswith("stolen")
    assert res["adversaries"]["1"]["exit_source"] == "exposed"
    assert 0 < res["calibration"]["flip_probability"] < 1  # chosen on the shadow


def test_the_collector_records_exactly_what_the_attacks_need(tmp_path):
    plan = _plan(["loss", "loss-hybrid"])
    assert "label_only_score" not in plan.signals
    run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)
    assert Signals.load(tmp_path / "signals_target.npz").label_only_score is None
    plan = _plan(["label-only"])
    assert plan.signals == signals_needed(["label-only"]) == {"pred_label", "label_only_score"}
    run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path / "lo", progress=False)
    t = Signals.load(tmp_path / "lo" / "signals_target.npz")
    assert t.label_only_score is not None and t.meta["calibration"]["flip_probability"] > 0


def test_adversary_two_attacks_with_the_stolen_exits(tmp_path):
    """Mutation guard: feeding adversary 2 the true exits (the reference code's bug) must fail here."""
    plan = _plan(["loss-hybrid", "exit-only"], repeats=1, warmup=0)
    res = run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)
    steal = res["exit_stealing"]
    chosen = steal["stealers"][steal["chosen"]]
    adv2 = res["adversaries"]["2"]
    assert adv2["exit_source"] == f"stolen-{steal['chosen']}"
    assert adv2["exit_accuracy"] == pytest.approx(chosen["accuracy"])
    assert res["adversaries"]["1"]["exit_accuracy"] == pytest.approx(1.0)
    assert chosen["accuracy"] < 1.0  # one noisy repeat: stealing errs, so true exits would show as 1.0 above


def test_attacks_are_fitted_on_the_shadow_only(tmp_path):
    """The reported threshold attack equals one fitted on the shadow, not one tuned on the target."""
    plan = _plan(["loss"])
    res = run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)
    s = Signals.load(tmp_path / "signals_shadow.npz")
    t = Signals.load(tmp_path / "signals_target.npz")
    on_shadow = get_attack("loss", seed=0).fit(s.with_exits(s.true_exit, "shadow-known"))
    on_target = get_attack("loss", seed=0).fit(t.with_exits(t.true_exit, "exposed"))
    got = res["adversaries"]["1"]["attacks"]["loss"]["balanced_accuracy"]["value"]
    expected = float(np.mean([np.mean(on_shadow.predict(t)[t.member]), np.mean(~on_shadow.predict(t)[~t.member])]))
    assert got == pytest.approx(expected)
    assert on_shadow.threshold_ != on_target.threshold_  # so a target-fitted threshold would be caught


def test_adversary_three_uses_its_own_shadow_and_the_blind_kde(tmp_path):
    plan = _plan(["loss", "loss-hybrid", "label-only"], adversaries=[2, 3])
    res = run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, shadow3=_side(3, 2), progress=False)
    assert set(res["adversaries"]) == {"2", "3"} and res["samples"]["shadow3"] == 80
    assert res["adversaries"]["3"]["exit_source"] == "stolen-kde-blind"
    assert "error" not in res["adversaries"]["3"]["attacks"]["label-only"]  # its shadow got label-only scores too
    s3 = Signals.load(tmp_path / "signals_shadow3.npz")
    assert s3.meta["calibration"]["flip_probability"] == res["calibration"]["flip_probability"]
    with pytest.raises(ConfigError, match="adversary 3"):
        run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path / "x", progress=False)


def test_rerun_reuses_collected_signals(tmp_path, monkeypatch):
    plan = _plan(["loss"])
    run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)
    monkeypatch.setattr(flow, "collect_signals", lambda *a, **k: pytest.fail("signals must be reused"))
    run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)


def test_bad_plans_and_query_sets_are_config_errors():
    with pytest.raises(ConfigError, match="at least 10"):
        QuerySet.from_split(lambda idx: np.zeros((len(idx), 2), np.float32), np.zeros(20, np.int64),
                            np.arange(5), np.arange(5, 20), 100, 0)
    with pytest.raises(ConfigError, match="unknown attack"):
        AttackPlan(attacks=["nope"])
    with pytest.raises(ConfigError, match="adversary"):
        AttackPlan(attacks=["loss"], adversaries=[4])


def test_query_sets_are_a_seeded_draw():
    inputs = lambda idx: idx[:, None].astype(np.float32)  # noqa: E731
    a = QuerySet.from_split(inputs, np.zeros(100, np.int64), np.arange(50), np.arange(50, 100), 20, 7)
    b = QuerySet.from_split(inputs, np.zeros(100, np.int64), np.arange(50), np.arange(50, 100), 20, 7)
    np.testing.assert_array_equal(a.index, b.index)
    assert set(a.index[:20]) <= set(range(50)) and set(a.index[20:]) <= set(range(50, 100))
    assert not np.array_equal(a.index[:20], np.arange(20))  # not the first N


def test_query_budget_queries_the_target_adaptively(tmp_path):
    plan = _plan(["loss", "loss-hybrid"], repeats=4, query_budget=3)
    res = run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)
    t = Signals.load(tmp_path / "signals_target.npz")
    s = Signals.load(tmp_path / "signals_shadow.npz")
    made = np.isfinite(t.latency_ns).sum(axis=1)
    assert made.mean() <= 3 + 1e-9 and made.min() >= 1  # the budget is a mean over samples
    assert np.isfinite(s.latency_ns).all() and s.latency_ns.shape[1] == 4  # the shadow keeps its fixed repeats
    assert t.meta.get("adaptive") and "2" in res["adversaries"]


@pytest.mark.parametrize("budget", [0.5, 10_000])
def test_a_query_budget_out_of_range_is_one_clear_error(tmp_path, budget):
    from mexit.errors import UserError

    plan = _plan(["loss"], query_budget=budget)
    with pytest.raises(UserError, match="query budget"):
        run_attack_flow(_side(1, 0), _side(2, 1), plan, tmp_path, progress=False)
    assert not (tmp_path / "signals_target.npz").exists()  # nothing half-written to be mistaken for a result


def test_deployed_accuracy_is_read_at_the_attacked_threshold():
    """A bundle exported at another τ than its run chose: the report's deployed accuracy is the attacked τ's."""
    from mexit.attacks.flow import deployed_at

    curve = [{"tau": t, "train_accuracy": 1.0 - t / 10, "test_accuracy": 0.5} for t in (0.0, 0.2, 0.9, 1.0)]
    metrics = {"deployed": curve[1], "deployed_curve": curve}
    assert deployed_at(metrics, 0.9)["tau"] == 0.9
    assert deployed_at(metrics, 0.88)["tau"] == 0.9  # the grid's nearest row
    assert deployed_at(metrics, None) is curve[1]  # a URL target without its bundle: the run's own choice
    assert deployed_at({"deployed": curve[1]}, 0.9) is curve[1]  # older runs without a curve

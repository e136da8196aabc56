"""The shadow pacer's measurements: the host's drift and per-exit centres on today's clock, and their use."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from mexit.attacks.collect import Adaptive, collect_signals
from mexit.attacks.pacing import MIN_ANSWERS_PER_EXIT, ShadowPacer, calibrate, drift_coupling, moves_with_host
from mexit.attacks.signals import SignalsError
from mexit.attacks.stealing import ExitTimingModel
from mexit.serve.client import InferResult, ServerUnreachableError
from mexit.serve.testing import ToyRuntime

from .test_collect import Timed, _pool


def _drift(t: np.ndarray, amplitude: float = 250e3, period: float = 1500.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * t / period)


def test_calibrate_recovers_centres_and_drift_from_noisy_labelled_answers() -> None:
    rng = np.random.default_rng(0)
    n, centres = 3000, np.array([4.0e6, 4.35e6, 4.7e6, 5.05e6])
    exits = np.arange(n) % 4
    t = np.arange(n)
    rtt = centres[exits] + _drift(t) + rng.normal(0, 400e3, n)  # σ 0.4 ms a query, drift ±0.25 ms
    cal = calibrate(rtt, exits, 4)
    # the centres carry the level and the drift its swings: compare both up to their shared constant
    level = np.median(cal.drift - _drift(t))
    assert np.allclose(cal.centres + level, centres, atol=50e3)  # 750 answers each: 1.25·σ/√750 ≈ 18 µs
    assert np.allclose(np.diff(cal.centres), np.diff(centres), atol=50e3)
    assert np.std(cal.drift - _drift(t)) < 60e3  # a window of 201 answers: 1.25·σ/√201 ≈ 35 µs
    assert np.std(cal.drift) > 150e3  # the swings themselves are kept, not averaged away
    assert np.array_equal(cal.counts, [750] * 4)
    # exits with too few answers get no centre; one exit per answer is required
    few = calibrate(rtt[:300], np.r_[np.zeros(295, int), np.ones(5, int)], 2)
    assert np.isfinite(few.centres[0]) and np.isnan(few.centres[1]) and MIN_ANSWERS_PER_EXIT > 5
    with pytest.raises(SignalsError, match="one exit per paced answer"):
        calibrate(rtt, exits[:10], 4)
    # no paced answer after the query: no correction; an answer newer than the calibration: its latest drift
    assert cal.at(np.array([[-1, 0], [n - 1, n + 5]])).tolist() == [[0.0, cal.drift[0]], [cal.drift[-1]] * 2]


class _Shadow:
    """A shadow deployment answering at ``centre[exit] + drift``; every seventh query fails."""

    def __init__(self, exits: np.ndarray, x: np.ndarray) -> None:
        self.rows = {x[i].tobytes(): i for i in range(len(x))}
        self.exits, self.calls, self.seen = exits, 0, []

    def infer(self, xb: np.ndarray) -> InferResult:
        self.calls += 1
        if self.calls % 7 == 0:
            raise ServerUnreachableError("down")
        i = self.rows[xb[0].tobytes()]
        self.seen.append(i)
        return InferResult(outputs={}, rtt_ns=int(1e6 * (1 + self.exits[i]) + _drift(np.array(self.calls))))


def test_pacer_cycles_the_shadow_rows_and_calibrates_once_it_has_enough_answers() -> None:
    x = np.random.default_rng(1).standard_normal((40, 4)).astype(np.float32)
    exits = np.r_[np.zeros(24, int), np.ones(10, int), np.full(6, 2)]
    shadow = _Shadow(exits, x)
    pacer = ShadowPacer(shadow, x, seed=3, exits=exits, num_exits=4)
    assert pacer.calibrates and pacer.calibration() is None
    for _ in range(800):
        pacer()
    sent = np.array(shadow.seen)
    # every row once per cycle of 40 sends: the shadow's natural exit mix (the host's traffic as recorded)
    assert np.bincount(sent, minlength=40).min() >= 15 and np.bincount(sent, minlength=40).max() <= 20
    assert pacer.failed == 114 and pacer.report()["answered"] == 686 and pacer.last == 685
    cal = pacer.calibration()
    assert cal is not None and np.isnan(cal.centres[3])  # the shadow never takes exit 3
    assert np.allclose(np.diff(cal.centres[:3]), 1e6, atol=30e3)
    assert sum(pacer.report()["calibration"]["answers_per_exit"]) == 686
    plain = ShadowPacer(_Shadow(exits, x), x, seed=3)  # without exits it only paces
    plain()
    assert not plain.calibrates and plain.calibration() is None and plain.last == 0
    with pytest.raises(SignalsError, match="40 samples"):
        ShadowPacer(shadow, x, exits=exits[:5])


def test_pacer_mirrors_the_exit_it_is_told_and_falls_back_to_the_natural_cycle() -> None:
    x = np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32)
    exits = np.r_[np.zeros(8, int), np.ones(3, int), [2]]
    shadow = _Shadow(exits, x)
    pacer = ShadowPacer(shadow, x, seed=0, exits=exits, num_exits=4)
    for hint in [1] * 6 + [2] * 3:  # the exit the attacker believes the previous target query took
        pacer(hint)
    assert exits[shadow.seen].tolist() == [1] * 6 + [2] * 2  # the 7th call failed
    assert sorted(shadow.seen[:3]) == [8, 9, 10]  # the rows of exit 1 in turn
    before = len(shadow.seen)
    for hint in (None, 3, None):  # no belief yet, or an exit the shadow never takes: the natural cycle
        pacer(hint)
    assert len(shadow.seen) == before + 3


def test_drift_coupling_tells_a_target_on_the_shadows_host_from_one_elsewhere() -> None:
    rng = np.random.default_rng(4)
    n, reps = 200, 6
    level = rng.choice([4e6, 4.4e6, 4.8e6], n)[:, None]  # each sample's exit
    drift = _drift(np.arange(n * reps).reshape(reps, n).T.astype(float))  # rounds visit all samples in turn
    noise = rng.normal(0, 500e3, (n, reps))
    beta, se, used = drift_coupling(level + drift + noise, drift)
    assert used == n * reps and abs(beta - 1) < 3 * se and se < 0.2
    assert moves_with_host(level + drift + noise, drift)
    assert not moves_with_host(level + noise, drift)  # the target does not move with the pacer's host
    lat = level + noise
    lat[:, 1:] = np.nan  # one query per sample: nothing within samples to compare
    assert not moves_with_host(lat, drift)


def test_recentred_model_blends_new_centres_on_the_new_clock() -> None:
    rng = np.random.default_rng(2)
    exits = np.r_[np.zeros(60, int), np.ones(30, int), np.full(2, 2)]
    lat = (2e6 + 0.5e6 * exits)[:, None] + rng.normal(0, 50e3, (len(exits), 6))
    lat[exits == 2] += 0.2e6  # the recording's rare exit came out 0.2 ms too slow
    model = ExitTimingModel.fit(lat, exits, 3, calibrate=False)
    # today's clock is 0.3 ms later; 1,000 paced answers at exits 0 and 1, 12 at exit 2 (as many as recorded)
    moved = model.recentred(np.array([2.3e6, 2.8e6, 3.3e6]), np.array([1000, 1000, 12]))
    assert moved.centres[:2] == pytest.approx([2.3e6, 2.8e6], abs=15e3)
    assert moved.centres[2] == pytest.approx((3.3e6 + model.centres[2] + 0.3e6) / 2, abs=15e3)  # equal weights
    assert np.allclose(moved.reference, model.reference + 0.3e6, atol=15e3)  # the offset estimate's clock
    # the gaps alone, on the recording's clock (a target that does not share today's clock)
    kept = model.recentred(np.array([2.3e6, 2.8e6, 3.3e6]), np.array([1000, 1000, 12]), clock=False)
    assert kept.centres[:2] == pytest.approx([2.0e6, 2.5e6], abs=15e3)
    assert kept.centres[2] == pytest.approx((3.0e6 + model.centres[2]) / 2, abs=15e3)
    assert np.array_equal(kept.reference, model.reference)
    missing = model.recentred(np.array([2.3e6, 2.8e6, np.nan]), np.array([1000, 1000, 0]))
    assert missing.centres[2] == pytest.approx(model.centres[2] + 0.3e6, abs=15e3)  # moved with the clock
    crossed = model.recentred(np.array([2.5e6, 2.4e6, 3.0e6]), np.array([1000, 1000, 1000]))
    assert np.all(np.diff(crossed.centres) >= 0)  # deeper exits are never faster
    assert model.recentred(np.full(3, np.nan)).centres.tolist() == model.centres.tolist()
    with pytest.raises(Exception, match="need 3 centres"):
        model.recentred(np.zeros(2))


class _Host:
    """One machine under the target and the shadow: its speed drifts with the number of queries it served."""

    def __init__(self) -> None:
        self.calls = 0

    def tick(self) -> float:
        self.calls += 1
        return float(_drift(np.array(self.calls), amplitude=350e3, period=1200.0))


class _OnHost(Timed):
    def __init__(self, *args: Any, host: _Host, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host = host

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> InferResult:
        res = super().infer(x, outputs)
        return InferResult(outputs=res.outputs, rtt_ns=int(res.rtt_ns + self.host.tick()))


@pytest.mark.parametrize("setting", ["corrected", "uncorrected", "target elsewhere"])
def test_drift_correction_follows_a_drifting_host_and_leaves_a_target_elsewhere_alone(setting: str) -> None:
    """The host's speed swings by ±0.35 ms (0.7 of an exit gap). A target on it swings with the pacer, so
    corrected decisions stay right where an offset (re-estimated between rounds) cannot follow; a target on
    another host does not swing with the pacer, and is left uncorrected."""
    toy = ToyRuntime(seed=7)
    xs, ys, ms = _pool(150, 11)
    shadow = collect_signals(Timed(toy, xs, seed=1), xs, ys, ms, repeats=12, warmup=0, progress=False,
                             true_exit_runtime=toy)
    model = ExitTimingModel.fit(shadow.latency_ns, shadow.true_exit, 3)
    host = _Host()
    x, y, m = _pool(150, 12)
    pacer = ShadowPacer(_OnHost(toy, xs, seed=5, host=host), xs, seed=0, exits=shadow.true_exit, num_exits=3)
    plan = Adaptive(model, query_budget=8.0, pace=pacer, drift_correction=setting != "uncorrected")
    target = Timed(toy, x, seed=2) if setting == "target elsewhere" else _OnHost(toy, x, seed=2, host=host)
    sig = collect_signals(target, x, y, m, warmup=0, progress=False, true_exit_runtime=toy, adaptive=plan)
    info = sig.meta["adaptive"]
    assert info["mean_queries"] == pytest.approx(8.0, abs=0.01)
    used = replace(model, offset=tuple(info["offset"]))
    if setting == "corrected":
        assert info["drift_coupling"]["corrected"] and abs(info["drift_coupling"]["slope"] - 1) < 0.4
        assert sig.latency_drift_ns is not None and sig.latency_drift_ns.shape == sig.latency_ns.shape
        assert np.nanstd(sig.latency_drift_ns) > 150e3  # the swings it measured are the host's
        cal = info["paced_with_shadow"]["calibration"]
        used = replace(used.recentred(np.array(cal["centres_ns"], dtype=float), np.array(cal["answers_per_exit"])),
                       offset=used.offset)
        assert (used.predict(sig.drift_corrected_latency_ns()) == sig.true_exit).mean() >= 0.95
        # the pacer mirrored the target's traffic (the exits it believed the target queries took): its answers
        # per exit are nearer the target's queries per exit than the shadow's own mix is
        asked = np.bincount(np.repeat(sig.true_exit, np.isfinite(sig.latency_ns).sum(axis=1)), minlength=3)
        paced, natural = np.array(cal["answers_per_exit"]), np.bincount(shadow.true_exit, minlength=3)

        def tv(a: np.ndarray, b: np.ndarray) -> float:
            return float(np.abs(a / a.sum() - b / b.sum()).sum() / 2)

        assert tv(paced, asked) < tv(natural, asked)
    elif setting == "uncorrected":
        assert sig.latency_drift_ns is None and not info["drift_correction"]
        # an offset (re-estimated between rounds) cannot follow the swings within the recording
        assert (used.predict(sig.latency_ns) == sig.true_exit).mean() < 0.93
    else:  # uncorrected, but judged against the pacer's centres (moved onto the recording's clock)
        assert sig.latency_drift_ns is None and not info["drift_coupling"]["corrected"]
        cal = info["paced_with_shadow"]["calibration"]
        used = replace(used.recentred(np.array(cal["centres_ns"], dtype=float), np.array(cal["answers_per_exit"]),
                                      clock=False), offset=used.offset)
        assert (used.predict(sig.latency_ns) == sig.true_exit).mean() >= 0.93  # the pacer's noise stays out


def test_a_resumed_collection_keeps_the_pacers_answers(tmp_path: Any) -> None:
    """The checkpoint holds the pacer's answers and which target query each followed, so the drift of a
    resumed run is measured on one log."""
    toy = ToyRuntime(seed=7)
    xs, ys, ms = _pool(150, 11)
    shadow = collect_signals(Timed(toy, xs, seed=1), xs, ys, ms, repeats=12, warmup=0, progress=False,
                             true_exit_runtime=toy)
    model = ExitTimingModel.fit(shadow.latency_ns, shadow.true_exit, 3)
    x, y, m = _pool(100, 12)
    host, ckpt = _Host(), tmp_path / "a.npz"

    def pacer() -> ShadowPacer:
        return ShadowPacer(_OnHost(toy, xs, seed=5, host=host), xs, seed=0, exits=shadow.true_exit, num_exits=3)

    first = pacer()
    stop = _OnHost(toy, x, seed=2, host=host, fail=lambda c: c > 400 and (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        collect_signals(stop, x, y, m, warmup=0, progress=False, true_exit_runtime=toy, checkpoint_path=ckpt,
                        adaptive=Adaptive(model, query_budget=6.0, pace=first))
    before = first.answers[0]
    second = pacer()
    sig = collect_signals(_OnHost(toy, x, seed=2, host=host), x, y, m, warmup=0, progress=False,
                          true_exit_runtime=toy, checkpoint_path=ckpt,
                          adaptive=Adaptive(model, query_budget=6.0, pace=second))
    after = second.answers[0]
    assert len(before) >= 400 and len(after) > len(before) and np.array_equal(after[: len(before)], before)
    assert sig.meta["adaptive"]["paced_with_shadow"]["answered"] == len(after)


@pytest.mark.parametrize("calibrating", [True, False])
def test_the_pacers_centres_fix_a_misrecorded_rare_exit_even_when_the_drift_is_not_applied(calibrating: bool) -> None:
    """A quiet host: nothing drifts, so the coupling test leaves the target's timings alone. The shadow
    recording holds three samples of exit 2, and they came out 0.45 ms slow (a rare exit's few recorded
    samples can be that far off); the pacer's answers at today's traffic put its centre back, and the
    adaptive decisions and the stealers use them."""
    toy = ToyRuntime(seed=7)
    xs, ys, ms = _pool(150, 11)
    shadow = collect_signals(Timed(toy, xs, seed=1, sigma=0.15e6), xs, ys, ms, repeats=12, warmup=0, progress=False,
                             true_exit_runtime=toy)
    keep = np.r_[np.flatnonzero(shadow.true_exit != 2), np.flatnonzero(shadow.true_exit == 2)[:3]]
    recorded = shadow.latency_ns[keep] + np.where(shadow.true_exit[keep] == 2, 0.45e6, 0.0)[:, None]
    model = ExitTimingModel.fit(recorded, shadow.true_exit[keep], 3)
    x, y, m = _pool(300, 12)
    rare = toy.predict(x).exit_index == 2
    pick = np.r_[np.flatnonzero(~rare)[:144], np.flatnonzero(rare)[:6]]  # the target's exit 2 is rare too
    x, y, m = x[pick], y[pick], m[pick]
    pacer = ShadowPacer(Timed(toy, xs, seed=5, sigma=0.15e6), xs, seed=0, exits=shadow.true_exit, num_exits=3)
    plan = Adaptive(model, query_budget=8.0, pace=pacer, drift_correction=calibrating)
    sig = collect_signals(Timed(toy, x, seed=2, sigma=0.15e6), x, y, m, warmup=0, progress=False, true_exit_runtime=toy,
                          adaptive=plan)
    info = sig.meta["adaptive"]
    assert sig.latency_drift_ns is None  # nothing to correct on a quiet host
    used = replace(model, offset=tuple(info["offset"]))
    if calibrating:
        assert not info["drift_coupling"]["corrected"]
        cal = info["paced_with_shadow"]["calibration"]
        used = replace(used.recentred(np.array(cal["centres_ns"], dtype=float), np.array(cal["answers_per_exit"]),
                                      clock=False), offset=used.offset)
    acc = balanced_accuracy_score(sig.true_exit, used.predict(sig.latency_ns))
    assert (acc >= 0.95) if calibrating else (acc < 0.9)  # balanced over the exits: exit 2's 6 samples count

"""Signal collection against in-process clients (the toy runtime and a real exported tiny bundle)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mexit.attacks.collect import Adaptive, Deployment, _round_order, collect_interleaved, collect_signals
from mexit.attacks.signals import Signals, SignalsError
from mexit.serve import LocalClient, OIPClient
from mexit.serve.client import InferResult, ServerError, ServerUnreachableError
from mexit.serve.testing import ToyRuntime

N = 24


@pytest.fixture
def toy() -> ToyRuntime:
    return ToyRuntime(seed=7)


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 16)).astype(np.float32)
    return x, rng.integers(0, 4, N), np.arange(N) % 2 == 0


class Recording:
    """Wraps a client; remembers which sample every query carried; can fail after ``fail_after`` queries."""

    def __init__(self, inner: Any, x: np.ndarray, fail_after: int | None = None) -> None:
        self.inner = inner
        self.rows = {x[i].tobytes(): i for i in range(len(x))}
        self.queried: list[int] = []
        self.fail_after = fail_after
        self.url, self.model_name = inner.url, inner.model_name

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> InferResult:
        assert x.shape[0] == 1, "one sample per request"
        if self.fail_after is not None and len(self.queried) >= self.fail_after:
            raise KeyboardInterrupt
        self.queried.append(self.rows[x[0].tobytes()])
        return self.inner.infer(x, outputs)


def test_collect_records_everything_exposed(toy: ToyRuntime, data: tuple) -> None:
    x, y, member = data
    client = Recording(LocalClient(toy, expose_exit=True), x)
    sig = collect_signals(client, x, y, member, repeats=3, warmup=5, seed=1, true_exit_runtime=toy, progress=False,
                          meta={"role": "target"})
    pred = toy.predict(x)
    assert sig.latency_ns.shape == (N, 3) and (sig.latency_ns > 0).all()
    assert np.array_equal(sig.pred_label, pred.labels)
    assert np.allclose(sig.probs, pred.probs)
    assert np.allclose(sig.loss, -np.log(pred.probs[np.arange(N), y]), rtol=1e-5)
    assert np.array_equal(sig.exit_index, pred.exit_index)
    assert np.array_equal(sig.true_exit, sig.exit_index)  # per-sample exits: batch truth == served answers
    assert sig.observed_exit == "exposed" and sig.meta["role"] == "target"
    assert sig.num_exits == 3 and sig.num_classes == 4
    assert np.array_equal(sig.member, member) and np.array_equal(sig.sample_index, np.arange(N))
    # warm-up first (not recorded), then 3 rounds, each a permutation of all samples in its own seeded order
    assert len(client.queried) == 5 + 3 * N
    rounds = [client.queried[5 + r * N : 5 + (r + 1) * N] for r in range(3)]
    for r, order in enumerate(rounds):
        assert sorted(order) == list(range(N))
        assert order == _round_order(1, r, N).tolist()
    assert rounds[0] != rounds[1] != rounds[2]


def test_exits_only_when_exposed_and_label_only(toy: ToyRuntime, data: tuple, tmp_path: Path) -> None:
    x, y, member = data
    sig = collect_signals(LocalClient(toy), x, y, member, repeats=1, warmup=0, progress=False, num_exits=3)
    assert sig.exit_index is None and sig.observed_exit == "none" and sig.probs is not None
    label_only = collect_signals(LocalClient(toy, expose="label"), x, y, member, repeats=2, warmup=2,
                                 true_exit_runtime=toy, progress=False)
    assert label_only.probs is None and label_only.loss is None and label_only.exit_index is None
    assert label_only.true_exit is not None and label_only.num_classes == 4
    label_only.save(tmp_path / "s.npz")
    again = Signals.load(tmp_path / "s.npz")
    assert np.array_equal(again.latency_ns, label_only.latency_ns)
    with pytest.raises(SignalsError, match="--expose probabilities"):
        collect_signals(LocalClient(toy, expose="label"), x, y, member, repeats=1, warmup=1, progress=False,
                        require=("probabilities",), num_exits=3)
    with pytest.raises(SignalsError, match="num_exits"):
        collect_signals(LocalClient(toy, expose="label"), x, y, member, repeats=1, warmup=0, progress=False)


def test_inconsistent_answers(data: tuple) -> None:
    x, y, member = data

    class Flaky(ToyRuntime):
        calls = 0

        def predict(self, x: np.ndarray, **kw: Any) -> Any:
            Flaky.calls += 1
            pred = super().predict(x, **kw)
            if Flaky.calls % 7 == 0:
                pred.labels[:] = (pred.labels + 1) % 4
            return pred

    with pytest.raises(SignalsError, match="not deterministic"):
        collect_signals(LocalClient(Flaky(seed=7)), x, y, member, repeats=3, warmup=0, progress=False, num_exits=3,
                        on_inconsistent="raise")
    sig = collect_signals(LocalClient(Flaky(seed=7)), x, y, member, repeats=3, warmup=0, progress=False, num_exits=3)
    assert sig.meta["inconsistent_samples"] > 0


def test_resume_after_interruption(toy: ToyRuntime, data: tuple, tmp_path: Path) -> None:
    x, y, member = data
    ckpt = tmp_path / "collect.ckpt.npz"
    first = Recording(LocalClient(toy, expose_exit=True), x, fail_after=4 + 40)  # 4 warm-ups + 40 of 72 queries
    with pytest.raises(KeyboardInterrupt):
        collect_signals(first, x, y, member, repeats=3, warmup=4, seed=3, checkpoint_path=ckpt, progress=False)
    assert ckpt.exists()
    second = Recording(LocalClient(toy, expose_exit=True), x)
    sig = collect_signals(second, x, y, member, repeats=3, warmup=4, seed=3, checkpoint_path=ckpt, progress=False)
    assert len(second.queried) == 4 + (3 * N - 40)  # warm-up again, then only what was missing
    assert (sig.latency_ns > 0).all()
    assert np.array_equal(sig.exit_index, toy.predict(x).exit_index)
    # the queries of the two runs together visit every round's order exactly once
    done = first.queried[4:] + second.queried[4:]
    assert done == np.concatenate([_round_order(3, r, N) for r in range(3)]).tolist()
    # a finished checkpoint answers at once
    third = Recording(LocalClient(toy, expose_exit=True), x)
    again = collect_signals(third, x, y, member, repeats=3, warmup=4, seed=3, checkpoint_path=ckpt, progress=False)
    assert third.queried == [] and np.array_equal(again.latency_ns, sig.latency_ns)


@pytest.mark.parametrize(("change", "named"), [({"repeats": 2}, "repeats"), ({"seed": 4}, "seed"),
                                               ({"x_shift": 1.0}, "samples")])
def test_mismatched_checkpoint_is_refused(toy: ToyRuntime, data: tuple, tmp_path: Path, change: dict,
                                          named: str) -> None:
    x, y, member = data
    ckpt = tmp_path / "c.npz"
    collect_signals(LocalClient(toy), x, y, member, repeats=3, warmup=0, seed=3, num_exits=3,
                    checkpoint_path=ckpt, progress=False)
    x2 = x + change.pop("x_shift", 0.0)
    args = {"repeats": 3, "seed": 3, **change}
    with pytest.raises(SignalsError, match=named):
        collect_signals(LocalClient(toy), x2, y, member, warmup=0, num_exits=3, checkpoint_path=ckpt,
                        progress=False, **args)


def test_unreachable_server_propagates(data: tuple) -> None:
    x, y, member = data
    client = OIPClient("http://127.0.0.1:9", "m", retries=0, timeout_s=2)
    with pytest.raises(ServerUnreachableError):
        collect_signals(client, x, y, member, repeats=1, warmup=1, num_exits=3, progress=False)


def test_bad_arguments(toy: ToyRuntime, data: tuple) -> None:
    x, y, member = data
    with pytest.raises(SignalsError, match="one label"):
        collect_signals(LocalClient(toy), x, y[:-1], member, progress=False)
    with pytest.raises(SignalsError, match="repeats"):
        collect_signals(LocalClient(toy), x, y, member, repeats=0, progress=False)


def test_collect_on_an_exported_bundle(tmp_path: Path) -> None:
    """The real chained runtime: per-sample exits in a batch equal the one-sample served exits."""
    pytest.importorskip("torch")
    from mexit.export import export_bundle
    from mexit.runtime import EarlyExitRuntime
    from tests.export import tiny

    model = tiny.tiny_mlp()
    x = tiny.mlp_inputs(30, seed=9)
    conf0 = tiny.torch_logits(model, x)[0]
    conf0 = np.exp(conf0 - conf0.max(1, keepdims=True))
    tau = tiny.mid_threshold((conf0 / conf0.sum(1, keepdims=True)).max(1), 0.5)
    bundle = export_bundle(model, tmp_path / "b", sample_inputs=x[:8], threshold=tau, dataset_name="toy-rows",
                           dataset_kind="tabular", exporter="legacy", save_torch_programs=False)
    runtime = EarlyExitRuntime(bundle)
    y = np.zeros(30, dtype=np.int64)
    sig = collect_signals(LocalClient(runtime, expose_exit=True), x, y, np.ones(30, bool), repeats=2, warmup=3,
                          true_exit_runtime=EarlyExitRuntime(bundle), progress=False)
    assert np.array_equal(sig.exit_index, sig.true_exit)
    assert len(np.unique(sig.true_exit)) >= 2
    assert sig.meta["true_exit_mismatch"] == 0


# ----------------------------------------------------------------------- adaptive querying, errors, drift
class Timed:
    """A client whose round-trip time is a synthetic function of the exit taken: ``base + gap * exit`` plus
    Gaussian jitter drawn from (sample, how often that sample was asked), so a resumed run sees the same
    timings. ``fail``: callable(call number) -> bool, raise a 503 on those calls."""

    def __init__(self, runtime: ToyRuntime, x: np.ndarray, *, base: float = 2e6, gap: float = 0.5e6,
                 sigma: float = 0.4e6, seed: int = 0, fail: Any = None, constant: bool = False) -> None:
        self.inner = LocalClient(runtime)
        self.runtime = runtime
        self.rows = {x[i].tobytes(): i for i in range(len(x))}
        self.asked = np.zeros(len(x), dtype=np.int64)
        self.base, self.gap, self.sigma, self.seed = base, gap, sigma, seed
        self.fail, self.calls, self.constant = fail, 0, constant
        self.url, self.model_name = f"timed://{seed}", "toy"
        self.order: list[int] = []

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> InferResult:
        self.calls += 1
        if self.fail is not None and self.fail(self.calls):
            raise ServerError(503, "overloaded", self.url)
        i = self.rows[x[0].tobytes()]
        self.order.append(i)
        k = int(self.runtime.predict(x).exit_index[0])
        noise = np.random.default_rng([self.seed, i, int(self.asked[i])]).normal(0, self.sigma)
        self.asked[i] += 1
        rtt = self.base if self.constant else self.base + self.gap * k + noise
        return InferResult(outputs=self.inner.infer(x, outputs).outputs, rtt_ns=int(max(rtt, 1.0)))


def _pool(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 16)).astype(np.float32), rng.integers(0, 4, n), np.arange(n) % 2 == 0


@pytest.fixture
def shadow_model(toy: ToyRuntime) -> Any:
    from mexit.attacks.stealing import ExitTimingModel

    x, y, m = _pool(150, 11)
    shadow = collect_signals(Timed(toy, x, seed=1), x, y, m, repeats=12, warmup=0, progress=False,
                             true_exit_runtime=toy)
    return ExitTimingModel.fit(shadow.latency_ns, shadow.true_exit, 3), shadow


def test_adaptive_querying_spends_queries_where_the_exit_is_uncertain(toy: ToyRuntime, shadow_model: Any) -> None:
    from mexit.attacks.stealing import steal_exits

    model, shadow = shadow_model
    x, y, m = _pool(120, 12)
    client = Timed(toy, x, seed=2)
    sig = collect_signals(client, x, y, m, warmup=0, progress=False, true_exit_runtime=toy,
                          adaptive=Adaptive(model, query_budget=8.0, confidence=0.95, min_queries=2,
                                            spend_budget=False))
    info = sig.meta["adaptive"]
    assert 2 <= info["shadow_plan"]["mean_queries"] <= 12  # said before querying: what the shadow's timings need
    first = info["first_decision_round"]  # every sample gets these before any may stop (half the replay's mean)
    assert first == max(2, min(-(-info["shadow_plan"]["mean_queries"] // 2), 4))
    fixed = collect_signals(Timed(toy, x, seed=2), x, y, m, repeats=first, warmup=0, progress=False,
                            true_exit_runtime=toy)
    assert info["mean_queries"] <= 8.0 and info["mean_queries"] == pytest.approx(client.asked.mean())
    assert sig.latency_ns.dtype == np.float64 and np.isnan(sig.latency_ns).any()
    assert np.array_equal(np.isfinite(sig.latency_ns).sum(axis=1), client.asked)
    # the samples asked more than `first` times are those whose first timings left the exit in doubt
    used = replace(model, offset=tuple(info["offsets"][0][1:]))  # the offset it estimated after the first rounds
    post_two = used.posterior(fixed.latency_ns.astype(np.float64)).max(axis=1)
    more = client.asked > first
    assert more.any() and (~more).any() and np.all(post_two[~more] >= 0.95) and np.all(post_two[more] < 0.95)
    # the stolen exits beat those of the same model on the fixed two queries
    adaptive_acc = (used.predict(sig.latency_ns) == sig.true_exit).mean()
    assert adaptive_acc > (used.predict(fixed.latency_ns) == fixed.true_exit).mean() + 0.05
    assert adaptive_acc >= 0.93
    res = steal_exits(sig.latency_ns, shadow.latency_ns, shadow.true_exit, 3, seed=0)  # NaN-padded repeats
    assert (res.stolen["chosen"] == sig.true_exit).mean() >= 0.9


def test_adaptive_querying_estimates_the_target_offset(toy: ToyRuntime, shadow_model: Any) -> None:
    model, _ = shadow_model
    x, y, m = _pool(120, 13)
    client = Timed(toy, x, seed=3, base=2e6 + 7.3e6)  # the target's stack adds 7.3 ms
    sig = collect_signals(client, x, y, m, warmup=0, progress=False, true_exit_runtime=toy,
                          adaptive=Adaptive(model, query_budget=10.0))
    assert sig.meta["adaptive"]["offset"][0] == pytest.approx(7.3e6, abs=0.15e6)  # 0.3 of the 0.5 ms gap
    shifted = replace(model, offset=tuple(sig.meta["adaptive"]["offset"]))
    assert (shifted.predict(sig.latency_ns) == sig.true_exit).mean() >= 0.93
    assert (model.predict(sig.latency_ns) == sig.true_exit).mean() < 0.5  # absolute times: all at the last exit


def test_adaptive_querying_follows_an_offset_that_moves(toy: ToyRuntime, shadow_model: Any) -> None:
    """The target's stack becomes 0.6 ms slower (more than an exit gap) after 400 queries, past the first
    decision round: the offset is estimated again each time the target has answered one more query per
    sample, so the later rounds do not keep reading every sample one exit deeper."""

    class Slower(Timed):
        def infer(self, xq: np.ndarray, outputs: list[str] | None = None) -> InferResult:
            res = super().infer(xq, outputs)
            return InferResult(outputs=res.outputs, rtt_ns=res.rtt_ns + (600_000 if self.calls > 400 else 0))

    model, _ = shadow_model
    x, y, m = _pool(120, 13)
    sig = collect_signals(Slower(toy, x, seed=3), x, y, m, warmup=0, progress=False, true_exit_runtime=toy,
                          adaptive=Adaptive(model, query_budget=10.0))
    offsets = sig.meta["adaptive"]["offsets"]
    assert len(offsets) >= 5 and offsets[0][0] < 400 and abs(offsets[0][1]) < 0.15e6  # first: before the change
    assert [o[0] for o in offsets] == sorted(o[0] for o in offsets)  # (queries answered, shift, scale)
    assert offsets[-1][1] > 0.3e6 and sig.meta["adaptive"]["offset"] == offsets[-1][1:]
    late = sig.latency_ns[:, 4:]  # slots 4 on: answered after the change (120 samples × 4 slots > 400)
    asked = np.isfinite(late).any(axis=1)
    assert asked.sum() >= 20

    def acc(offset: list[float]) -> float:
        return float((replace(model, offset=tuple(offset)).predict(late[asked]) == sig.true_exit[asked]).mean())

    # the first offset reads them one exit deeper; the last one, estimated on all answers (the earlier ones
    # too), has moved most of the way (0.4 of the 0.6 ms here)
    assert acc(offsets[-1][1:]) >= 0.75 and acc(offsets[0][1:]) < 0.6


def test_adaptive_budget_out_of_range_is_one_line(shadow_model: Any) -> None:
    model, _ = shadow_model
    for budget in (0.5, 10_000):
        with pytest.raises(SignalsError, match="query budget must be between 1 and"):
            Adaptive(model, query_budget=budget)
    with pytest.raises(SignalsError, match="min_queries"):
        Adaptive(model, query_budget=2, min_queries=3)
    assert Adaptive(model, query_budget=1).min_queries == 1 and Adaptive(model, query_budget=4).min_queries == 2


def test_adaptive_resume_makes_the_same_decisions(toy: ToyRuntime, shadow_model: Any, tmp_path: Path) -> None:
    model, _ = shadow_model
    x, y, m = _pool(60, 14)
    plan = Adaptive(model, query_budget=4.0)
    whole = collect_signals(Timed(toy, x, seed=4), x, y, m, warmup=0, progress=False, num_exits=3, adaptive=plan)
    ckpt = tmp_path / "a.npz"
    first = Timed(toy, x, seed=4, fail=lambda c: c > 150 and (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        collect_signals(first, x, y, m, warmup=0, progress=False, num_exits=3, adaptive=plan, checkpoint_path=ckpt)
    second = Timed(toy, x, seed=4)
    second.asked = first.asked.copy()  # the deployment's jitter continues where it was
    again = collect_signals(second, x, y, m, warmup=0, progress=False, num_exits=3, adaptive=plan,
                            checkpoint_path=ckpt)
    assert len(second.order) == int(np.isfinite(whole.latency_ns).sum()) - 150
    assert np.array_equal(np.isnan(again.latency_ns), np.isnan(whole.latency_ns))
    assert np.allclose(again.latency_ns, whole.latency_ns, equal_nan=True)


def test_server_errors_are_retried_counted_and_lost(toy: ToyRuntime, data: tuple,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    x, y, member = data
    every_7th = Timed(toy, x, fail=lambda c: c > 3 and c % 7 == 0)  # transient: a retry succeeds
    sig = collect_signals(every_7th, x, y, member, repeats=3, warmup=2, progress=False, num_exits=3,
                          backoff_s=0.0)
    assert sig.meta["retried_queries"] > 0 and sig.meta["lost_queries"] == 0 and sig.latency_ns.dtype == np.int64
    # sample 0's queries after its first answer always fail: lost, NaN, reported; the collection goes on
    row0 = x[0].tobytes()
    answered = {"n": 0}

    class Broken(Timed):
        def infer(self, xq: np.ndarray, outputs: list[str] | None = None) -> InferResult:
            if xq[0].tobytes() == row0:
                answered["n"] += 1
                if answered["n"] > 1:
                    raise ServerError(502, "bad gateway", self.url)
            return super().infer(xq, outputs)

    with caplog.at_level("WARNING"):
        sig = collect_signals(Broken(toy, x), x, y, member, repeats=3, warmup=0, progress=False, num_exits=3,
                              retries=2, backoff_s=0.0)
    assert sig.meta["lost_queries"] == 2 and np.isnan(sig.latency_ns[0]).sum() == 2
    assert np.isfinite(sig.latency_ns[1:]).all() and "lost" in caplog.text
    # a deployment failing most queries stops with one line
    with pytest.raises(SignalsError, match=r"failed .* queries"):
        collect_signals(Timed(toy, x, fail=lambda c: c > 3 and c % 3 != 0), x, y, member, repeats=3, warmup=1,
                        progress=False, num_exits=3, retries=1, backoff_s=0.0)


def test_constant_timing_is_reported(toy: ToyRuntime, data: tuple, caplog: pytest.LogCaptureFixture) -> None:
    from mexit.attacks.stealing import ExitTimingModel

    x, y, member = data
    with caplog.at_level("WARNING"):
        sig = collect_signals(Timed(toy, x, constant=True), x, y, member, repeats=3, warmup=0, progress=False,
                              true_exit_runtime=toy)
    assert sig.meta["timing_informative"] is False and "constant-time padding" in caplog.text
    varied = collect_signals(Timed(toy, x), x, y, member, repeats=3, warmup=0, progress=False, num_exits=3)
    assert varied.meta["timing_informative"] is True
    padded = ExitTimingModel.fit(sig.latency_ns, sig.true_exit, 3)
    assert not padded.informative()
    client = Timed(toy, x, constant=True)
    with caplog.at_level("WARNING"):
        adaptive = collect_signals(client, x, y, member, warmup=0, progress=False, num_exits=3,
                                   adaptive=Adaptive(padded, query_budget=10))
    assert (client.asked == 2).all() and adaptive.meta["adaptive"]["timing_informative"] is False


def test_interleaved_collection_mixes_the_deployments_in_every_round(toy: ToyRuntime) -> None:
    xs, ys, ms = _pool(30, 15)
    xt, yt, mt = _pool(20, 16)
    shadow_client, target_client = Timed(toy, xs, seed=5), Timed(toy, xt, seed=6)
    seen: list[str] = []
    for name, c in (("shadow", shadow_client), ("target", target_client)):
        inner = c.infer
        c.infer = (lambda f, nm: lambda xq, outputs=None: (seen.append(nm), f(xq, outputs))[1])(inner, name)
    out = collect_interleaved({"shadow": Deployment(shadow_client, xs, ys, ms, true_exit_runtime=toy),
                               "target": Deployment(target_client, xt, yt, mt, true_exit_runtime=toy)},
                              repeats=3, warmup=0, seed=2, progress=False)
    assert set(out) == {"shadow", "target"} and len(out["shadow"]) == 30 and len(out["target"]) == 20
    assert out["target"].latency_ns.shape == (20, 3) and out["target"].meta["interleaved_with"] == ["shadow"]
    assert np.array_equal(out["shadow"].true_exit, toy.predict(xs).exit_index)
    first_round = seen[:50]
    switches = sum(a != b for a, b in itertools.pairwise(first_round))
    assert switches > 10  # one shuffled schedule, not one deployment after the other
    assert (shadow_client.asked == 3).all() and (target_client.asked == 3).all()


def test_adaptive_querying_paces_every_target_query_with_one_shadow_query(toy: ToyRuntime,
                                                                           shadow_model: Any) -> None:
    """The recording's traffic mix: after each target query (warm-up included) one query to the shadow."""
    from mexit.attacks.collect import ShadowPacer

    model, _ = shadow_model
    x, y, m = _pool(60, 14)
    events: list[str] = []

    class Logged(Timed):
        def infer(self, xb: np.ndarray, outputs: Any = None) -> InferResult:
            events.append("target")
            return super().infer(xb, outputs)

    class ShadowClient:
        calls = 0

        def infer(self, xb: np.ndarray) -> None:
            events.append("shadow")
            ShadowClient.calls += 1
            if ShadowClient.calls % 5 == 0:  # a flaky shadow is counted, never raised
                raise ServerUnreachableError("down")

    pacer = ShadowPacer(ShadowClient(), x[:7], seed=0)
    sig = collect_signals(Logged(toy, x, seed=4), x, y, m, warmup=3, progress=False, true_exit_runtime=toy,
                          adaptive=Adaptive(model, query_budget=4.0, pace=pacer))
    assert events[0::2] == ["target"] * (len(events) // 2) and events[1::2] == ["shadow"] * (len(events) // 2)
    info = sig.meta["adaptive"]["paced_with_shadow"]
    assert info["sent"] == len(events) // 2 and info["failed"] == info["sent"] // 5
    assert Adaptive(model, query_budget=4.0, pace=pacer).fingerprint() == \
        Adaptive(model, query_budget=4.0).fingerprint()  # pacing does not change what a resumed run decides
    with pytest.raises(SignalsError, match="at least one shadow sample"):
        ShadowPacer(ShadowClient(), x[:0])
    with pytest.raises(SignalsError, match="share"):
        ShadowPacer(ShadowClient(), x[:3], share=0)
    half = ShadowPacer(ShadowClient(), x[:3], seed=1, share=0.5)  # after about half of the target's queries
    for _ in range(2000):
        half()
    assert 0.45 < half.sent / 2000 < 0.55

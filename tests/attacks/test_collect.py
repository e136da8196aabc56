"""Signal collection against in-process clients (the toy runtime and a real exported tiny bundle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mexit.attacks.collect import _round_order, collect_signals
from mexit.attacks.signals import Signals, SignalsError
from mexit.serve import LocalClient, OIPClient
from mexit.serve.client import InferResult, ServerUnreachableError
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

"""EarlyExitRuntime on the ONNX Runtime CPU backend: per-sample exits, policies, overrides, validation."""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort
import pytest

from mexit.errors import BackendUnavailableError, ConfigError, InputError
from mexit.runtime import (
    EarlyExitRuntime,
    OrtCpuBackend,
    OrtGpuBackend,
    Prediction,
    Runtime,
    get_backend,
    normalized_entropy,
    softmax,
)
from mexit.runtime.backends import gather_model_bytes
from tests.export import tiny


def expected_exits(per_exit_probs: list[np.ndarray], rule) -> np.ndarray:
    """First exit whose probabilities satisfy ``rule`` (the final exit otherwise), sample by sample."""
    k_last = len(per_exit_probs) - 1
    out = np.full(len(per_exit_probs[0]), k_last)
    for k in range(k_last - 1, -1, -1):
        out[rule(per_exit_probs[k])] = k
    return out


@pytest.fixture(scope="module")
def conv_rt(conv_bundle):
    return EarlyExitRuntime(conv_bundle)


@pytest.fixture(scope="module")
def batch():
    return tiny.conv_inputs(48, seed=11)


@pytest.fixture(scope="module")
def per_exit(conv_rt, batch):
    """Per-exit softmax of every sample (force_exit gives each exit's probabilities for the whole batch)."""
    return [conv_rt.predict(batch, force_exit=k).probs for k in range(conv_rt.num_exits)]


@pytest.fixture(scope="module")
def mixed_tau(per_exit):
    return tiny.mid_threshold(per_exit[0].max(axis=1), 0.5)


def test_runtime_protocol_and_properties(conv_rt, conv_bundle):
    assert isinstance(conv_rt, Runtime)
    assert conv_rt.input_shape == (1, 8, 8)
    assert conv_rt.num_classes == tiny.NUM_CLASSES
    assert conv_rt.num_exits == 3
    assert conv_rt.threshold == pytest.approx(0.8)  # the manifest's default
    assert conv_rt.manifest.model.arch == "tiny-conv"
    assert conv_rt.exit_costs == sorted(conv_rt.exit_costs)


def test_force_exit_matches_pytorch(conv_rt, conv_model, batch, per_exit):
    ref = tiny.torch_logits(conv_model, batch)
    for k in range(3):
        pred = conv_rt.predict(batch, force_exit=k)
        assert (pred.exit_index == k).all()
        np.testing.assert_allclose(pred.probs, softmax(ref[k]), atol=1e-5)
        np.testing.assert_array_equal(pred.labels, ref[k].argmax(axis=1))


def test_mixed_batch_equals_batch_one(conv_bundle, batch, per_exit, mixed_tau):
    rt = EarlyExitRuntime(conv_bundle, threshold=mixed_tau)
    pred = rt.predict(batch)
    counts = np.bincount(pred.exit_index, minlength=3)
    assert (counts > 0).all(), f"the batch should use every exit, got {counts}"
    np.testing.assert_array_equal(pred.exit_index, expected_exits(per_exit, lambda p: p.max(axis=1) >= mixed_tau))
    for i in range(len(batch)):
        one = rt.predict(batch[i : i + 1])
        assert one.exit_index[0] == pred.exit_index[i]
        np.testing.assert_allclose(one.probs[0], pred.probs[i], atol=1e-6)
        assert one.labels[0] == pred.labels[i]
    # each sample's probabilities are those of the exit it left at
    rows = np.arange(len(batch))
    stacked = np.stack(per_exit)  # (K, n, C)
    np.testing.assert_allclose(pred.probs, stacked[pred.exit_index, rows], atol=1e-6)
    assert pred.probs.dtype == np.float32 and pred.labels.dtype == np.int64
    assert pred.exit_index.dtype == np.int64 and pred.latency_ns.dtype == np.int64
    assert len(pred) == len(batch)


def test_latency_monotone_in_exit_index(conv_bundle, batch, mixed_tau):
    rt = EarlyExitRuntime(conv_bundle, threshold=mixed_tau)
    pred = rt.predict(batch)
    assert (pred.latency_ns > 0).all()
    for k in range(2):
        assert pred.latency_ns[pred.exit_index == k].max() < pred.latency_ns[pred.exit_index == k + 1].min()
    # samples that leave at the same exit share their decision time
    for k in range(3):
        assert len(set(pred.latency_ns[pred.exit_index == k].tolist())) == 1


def test_full_depth_equals_final_exit(conv_rt, batch, per_exit):
    full = conv_rt.predict(batch, full_depth=True)
    assert (full.exit_index == 2).all()
    np.testing.assert_allclose(full.probs, per_exit[-1], atol=1e-6)
    assert (full.latency_ns > 0).all()


def test_threshold_extremes(conv_bundle, batch):
    assert (EarlyExitRuntime(conv_bundle, threshold=0.0).predict(batch).exit_index == 0).all()
    assert (EarlyExitRuntime(conv_bundle, threshold=1.01).predict(batch).exit_index == 2).all()


def test_threshold_override_leaves_manifest_alone(conv_bundle, batch, per_exit, mixed_tau):
    default = EarlyExitRuntime(conv_bundle)
    assert default.threshold == pytest.approx(0.8)
    np.testing.assert_array_equal(default.predict(batch).exit_index,
                                  expected_exits(per_exit, lambda p: p.max(axis=1) >= 0.8))
    override = EarlyExitRuntime(conv_bundle, threshold=mixed_tau)
    assert override.threshold == pytest.approx(mixed_tau)
    assert override.manifest.policy.threshold == pytest.approx(0.8)


def test_entropy_policy(conv_bundle, batch, per_exit):
    ent0 = normalized_entropy(per_exit[0])
    assert ((ent0 >= 0) & (ent0 <= 1)).all()
    tau = tiny.mid_threshold(ent0, 0.5)
    rt = EarlyExitRuntime(conv_bundle, policy="entropy", threshold=tau)
    pred = rt.predict(batch)
    want = expected_exits(per_exit, lambda p: normalized_entropy(p) <= tau)
    np.testing.assert_array_equal(pred.exit_index, want)
    assert len(np.unique(pred.exit_index)) >= 2
    assert (EarlyExitRuntime(conv_bundle, policy="entropy", threshold=1.0).predict(batch).exit_index == 0).all()
    assert (EarlyExitRuntime(conv_bundle, policy="entropy", threshold=-0.1).predict(batch).exit_index == 2).all()


def test_normalized_entropy_bounds():
    c = 7
    uniform = np.full((1, c), 1 / c, dtype=np.float32)
    onehot = np.eye(c, dtype=np.float32)[:1]
    assert normalized_entropy(uniform)[0] == pytest.approx(1.0, abs=1e-6)
    assert normalized_entropy(onehot)[0] == pytest.approx(0.0, abs=1e-7)


def test_softmax_is_stable_for_huge_logits():
    p = softmax(np.array([[1e4, 0.0, -1e4], [3.0, 3.0, 3.0]], dtype=np.float32))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    assert p[0, 0] == pytest.approx(1.0)


def test_tabular_bundle_uses_manifest_entropy_policy(mlp_bundle, mlp_model):
    rt = EarlyExitRuntime(mlp_bundle)
    assert rt.policy.kind == "entropy" and rt.threshold == pytest.approx(0.5)
    x = tiny.mlp_inputs(32, seed=21)
    pred = rt.predict(x)
    ref = [softmax(lg) for lg in tiny.torch_logits(mlp_model, x)]
    np.testing.assert_array_equal(pred.exit_index, expected_exits(ref, lambda p: normalized_entropy(p) <= 0.5))
    # integer rows are accepted for tabular data and cast as they are
    xi = np.round(x * 3).astype(np.int32)
    np.testing.assert_allclose(rt.predict(xi).probs, rt.predict(xi.astype(np.float32)).probs, atol=1e-7)


def test_input_dtypes_are_converted(conv_rt, batch):
    base = conv_rt.predict(batch, force_exit=1).probs
    np.testing.assert_allclose(conv_rt.predict(batch.astype(np.float64), force_exit=1).probs, base, atol=1e-7)
    np.testing.assert_allclose(conv_rt.predict(np.asfortranarray(batch), force_exit=1).probs, base, atol=1e-7)
    pixels = np.round(batch * 255).astype(np.uint8)
    np.testing.assert_allclose(
        conv_rt.predict(pixels, force_exit=1).probs,
        conv_rt.predict(pixels.astype(np.float32) / np.float32(255), force_exit=1).probs,
        atol=1e-7,
    )


@pytest.mark.parametrize(
    ("bad", "needles"),
    [
        ([[0.0] * 64], ["numpy array", "list"]),
        (np.zeros((2, 1, 8, 8), dtype=np.complex64), ["complex64"]),
        (np.zeros((2, 1, 8, 8), dtype=bool), ["bool"]),
        (np.zeros((2, 1, 8, 8), dtype=object), ["object"]),
        (np.zeros((2, 1, 8, 8), dtype=np.int64), ["int64", "float32"]),
        (np.zeros((1, 8, 8), dtype=np.float32), ["rank 4", "(1, 8, 8)", "batch axis"]),
        (np.zeros((2, 1, 8, 9), dtype=np.float32), ["(1, 8, 8)", "(2, 1, 8, 9)"]),
        (np.zeros((0, 1, 8, 8), dtype=np.float32), ["non-empty", "(0, 1, 8, 8)"]),
        (np.full((2, 1, 8, 8), np.nan, dtype=np.float32), ["finite", "128"]),
        (np.full((2, 1, 8, 8), 1e300), ["finite", "float32 range"]),
    ],
)
def test_bad_inputs_raise_input_error(conv_rt, bad, needles):
    with pytest.raises(InputError) as info:
        conv_rt.predict(bad)
    assert isinstance(info.value, ValueError)
    for needle in needles:
        assert needle in str(info.value)


def test_inf_is_rejected(conv_rt, batch):
    x = batch.copy()
    x[3, 0, 2, 2] = np.inf
    with pytest.raises(InputError, match="1 NaN/inf"):
        conv_rt.predict(x)


@pytest.mark.parametrize("single_graph", [True, False])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_request_is_refused_on_both_paths(conv_bundle, batch, single_graph, value):
    """Batch 1 on the single graph checks finiteness inside the graph (no numpy between requests): the same
    one-line error as the numpy check of the chain, and no result; the runtime serves the next request."""
    rt = EarlyExitRuntime(conv_bundle, single_graph=single_graph)
    assert (rt._one is not None) is single_graph and rt._one_checks_finite is single_graph
    x = batch[:1].copy()
    x[0, 0, 1, 5] = value
    with pytest.raises(InputError, match=r"^expected finite values, got 1 NaN/inf value\(s\)$"):
        rt.predict(x)
    x[0, 0, 2, 2] = value
    with pytest.raises(InputError, match="got 2 NaN/inf"):
        rt.predict(x, force_exit=0)
    with pytest.raises(InputError, match="float32 range"):  # converted inputs are still checked by numpy
        rt.predict(np.full((1, 1, 8, 8), 1e300))
    ok = rt.predict(batch[:1])
    assert ok.exit_index.shape == ok.labels.shape == ok.latency_ns.shape == (1,)
    assert ok.labels.dtype == np.int64 and ok.labels[0] == ok.probs[0].argmax()


def test_single_graph_labels_are_the_probabilities_argmax(conv_bundle):
    x = tiny.conv_inputs(32, seed=21)
    rt = EarlyExitRuntime(conv_bundle)
    for i in range(len(x)):
        got = rt.predict(x[i : i + 1])
        assert got.labels.dtype == np.int64 and got.labels[0] == got.probs.argmax(axis=1)[0]


def test_validate_inputs_can_leave_finiteness_to_the_backend():
    from mexit.runtime.inputs import validate_inputs

    x = np.full((1, 3), np.nan, dtype=np.float32)
    assert validate_inputs(x, (3,), "tabular", finite=False) is x
    with pytest.raises(InputError, match="3 NaN/inf"):
        validate_inputs(x, (3,), "tabular")
    with pytest.raises(InputError, match="finite"):  # a conversion is always followed by the check
        validate_inputs(x.astype(np.float64), (3,), "tabular", finite=False)


def test_bad_call_options(conv_rt, batch, conv_bundle):
    with pytest.raises(InputError, match=r"0\.\.2"):
        conv_rt.predict(batch, force_exit=3)
    with pytest.raises(InputError, match="exclusive"):
        conv_rt.predict(batch, force_exit=0, full_depth=True)
    with pytest.raises(ConfigError, match="unknown exit policy"):
        EarlyExitRuntime(conv_bundle, policy="margin")
    with pytest.raises(ConfigError, match="finite"):
        EarlyExitRuntime(conv_bundle, threshold=float("nan"))
    with pytest.raises(ConfigError, match="unknown backend"):
        EarlyExitRuntime(conv_bundle, backend="tflite")
    with pytest.raises(ConfigError, match="onnxruntime"):
        EarlyExitRuntime(conv_bundle, intra_op_treads=2)


class _Chunked:
    """An ORT backend that claims a small max_batch, to exercise the runtime's batch splitting."""

    def __init__(self, inner: OrtCpuBackend, max_batch: int) -> None:
        self.inner, self.max_batch, self.name, self.thread_safe = inner, max_batch, "chunked", False
        self.sizes: list[int] = []

    def run_stage(self, k, inputs):
        self.sizes.append(len(inputs))
        return self.inner.run_stage(k, inputs)

    def take(self, features, idx):
        return self.inner.take(features, idx)

    def full(self, x):
        return self.inner.full(x)

    def close(self):
        self.inner.close()


def test_batches_above_backend_max_batch_are_split(conv_bundle, batch, mixed_tau):
    want = EarlyExitRuntime(conv_bundle, threshold=mixed_tau).predict(batch)
    backend = _Chunked(get_backend("onnxruntime", conv_bundle), max_batch=5)
    got = EarlyExitRuntime(conv_bundle, backend=backend, threshold=mixed_tau).predict(batch)
    assert max(backend.sizes) <= 5
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)


class _ReusedOutputs(_Chunked):
    """A backend returning its logits in one buffer it overwrites on every call, as device backends may do."""

    def __init__(self, inner: OrtCpuBackend) -> None:
        super().__init__(inner, max_batch=None)
        self.buffer: np.ndarray | None = None

    def run_stage(self, k, inputs):
        features, logits = super().run_stage(k, inputs)
        if self.buffer is None or self.buffer.shape[1] != logits.shape[1]:
            self.buffer = np.empty((len(inputs) * 4, logits.shape[1]), dtype=np.float32)
        view = self.buffer[: len(logits)]
        view[...] = logits
        return features, view


def test_stage_outputs_a_later_stage_overwrites_do_not_leak_into_results(conv_bundle, batch, per_exit, mixed_tau):
    # the chain writes its results after the last stage: what it keeps until then must be its own
    backend = _ReusedOutputs(get_backend("onnxruntime", conv_bundle))
    got = EarlyExitRuntime(conv_bundle, backend=backend, threshold=mixed_tau).predict(batch)
    assert len(set(backend.sizes)) > 1, "the batch should be compacted between stages"
    np.testing.assert_allclose(got.probs, np.stack(per_exit)[got.exit_index, np.arange(len(batch))], atol=1e-6)


def test_warmup_and_context_manager(conv_bundle):
    with EarlyExitRuntime(conv_bundle) as rt:
        rt.warmup(2)
        assert "tiny-conv" in repr(rt)


def test_warmup_covers_every_batch_size(conv_bundle):
    backend = _Chunked(get_backend("onnxruntime", conv_bundle), max_batch=64)
    rt = EarlyExitRuntime(conv_bundle, backend=backend)
    rt.warmup(1, batch_sizes=range(1, 5))
    seen = sorted(set(backend.sizes))
    assert seen == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="positive"):
        rt.warmup(1, batch_sizes=[0])


def test_batch_one_path_does_not_compact(conv_bundle, batch):
    calls: list[int] = []
    rt = EarlyExitRuntime(conv_bundle, threshold=1.01)
    inner_take = rt.backend.take
    rt.backend.take = lambda f, idx: calls.append(len(idx)) or inner_take(f, idx)  # type: ignore[method-assign]
    rt.predict(batch[:1])
    assert calls == []


def test_gather_graph_compacts_rows():
    model = gather_model_bytes()
    if model is None:
        pytest.skip("the onnx package is not installed")
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    data = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    idx = np.array([0, 3, 4], dtype=np.int64)
    np.testing.assert_array_equal(sess.run(None, {"data": data, "idx": idx})[0], data[idx])


def test_gpu_backend_unavailable_is_explained(conv_bundle, batch, mixed_tau):
    if "CUDAExecutionProvider" in ort.get_available_providers():  # a GPU box: partial exits, compaction, full()
        rt = EarlyExitRuntime(conv_bundle, backend="onnxruntime-gpu", threshold=mixed_tau)
        cpu = EarlyExitRuntime(conv_bundle, threshold=mixed_tau)
        want, got = cpu.predict(batch), rt.predict(batch)
        assert len(np.unique(want.exit_index)) == 3
        np.testing.assert_array_equal(got.exit_index, want.exit_index)
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
        np.testing.assert_allclose(rt.predict(batch, full_depth=True).probs, cpu.predict(batch, full_depth=True).probs,
                                   atol=1e-4)
        return
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        OrtGpuBackend(conv_bundle)


def test_tensorrt_backend_unavailable_is_explained(conv_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable, whether or not it is installed
    with pytest.raises(BackendUnavailableError, match=r"mexit\[tensorrt\]"):
        EarlyExitRuntime(conv_bundle, backend="tensorrt")


def test_prediction_is_frozen(conv_rt, batch):
    pred = conv_rt.predict(batch[:2])
    assert isinstance(pred, Prediction)
    with pytest.raises(AttributeError):
        pred.labels = None  # type: ignore[misc]


@pytest.mark.parametrize("batch_graph", [False, True])
def test_at_the_bundles_threshold_the_graphs_take_their_default_thresholds(conv_bundle, batch, per_exit, batch_graph):
    rt = EarlyExitRuntime(conv_bundle, batch_graph=batch_graph)  # the bundle's own threshold (0.8)
    assert rt._taus(None) == {} and rt.backend.tau_default == pytest.approx(0.8)
    assert len(rt._taus(1)) == rt.num_exits - 1  # forcing an exit still feeds every threshold
    pred = rt.predict(batch)
    np.testing.assert_array_equal(pred.exit_index, expected_exits(per_exit, lambda p: p.max(axis=1) >= 0.8))
    for i in range(len(batch)):
        one = rt.predict(batch[i : i + 1])
        assert one.exit_index[0] == pred.exit_index[i]
        np.testing.assert_allclose(one.probs[0], pred.probs[i], atol=1e-6)
        assert rt.predict(batch[i : i + 1], force_exit=1).exit_index[0] == 1
    other = EarlyExitRuntime(conv_bundle, threshold=0.5)  # any other threshold is fed explicitly
    assert len(other._taus(None)) == other.num_exits - 1


def test_a_ready_float32_request_takes_the_fast_path_with_the_general_paths_answer(conv_bundle, batch):
    fast, general = EarlyExitRuntime(conv_bundle), EarlyExitRuntime(conv_bundle)
    general._fast_one = None
    calls: list[int] = []
    inner = fast._one
    fast._one = lambda xi, taus: calls.append(1) or inner(xi, taus)  # the fast path looks _one up per call
    for i in range(len(batch)):
        a, b = fast.predict(batch[i : i + 1]), general.predict(batch[i : i + 1])
        assert a.exit_index[0] == b.exit_index[0] and a.labels[0] == b.labels[0]
        np.testing.assert_array_equal(a.probs, b.probs)
        assert a.latency_ns.dtype == np.int64 and a.latency_ns.shape == (1,) and a.latency_ns[0] > 0
    assert len(calls) == len(batch)
    # what the fast path does not take goes the general way, with its conversions and errors
    x1 = batch[:1]
    for other in (x1.astype(">f4"), x1.astype(np.float64), np.asfortranarray(x1[0, 0])[None, None]):
        if other.shape == x1.shape:
            np.testing.assert_allclose(fast.predict(other).probs, general.predict(x1).probs, atol=1e-6)
    with pytest.raises(InputError, match="shape"):
        fast.predict(batch[:1, :, :4])
    nan = x1.copy()
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        fast.predict(nan)

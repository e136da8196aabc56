"""The PyTorch backend (torch.export programs from the bundle) agrees with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import pytest

from mexit.errors import BackendUnavailableError, BundleError, ConfigError
from mexit.runtime import EarlyExitRuntime, get_backend
from mexit.runtime.torch_backend import buckets
from tests.export import tiny

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def batch():
    return tiny.conv_inputs(40, seed=31)


def test_torch_backend_matches_onnxruntime(conv_bundle, batch):
    ort_rt = EarlyExitRuntime(conv_bundle)
    tau = tiny.mid_threshold(ort_rt.predict(batch, force_exit=0).probs.max(axis=1), 0.4)
    ort_rt = EarlyExitRuntime(conv_bundle, threshold=tau)
    torch_rt = EarlyExitRuntime(conv_bundle, backend="torch", threshold=tau, threads=1)
    a, b = ort_rt.predict(batch), torch_rt.predict(batch)
    assert len(np.unique(a.exit_index)) >= 2
    np.testing.assert_array_equal(a.exit_index, b.exit_index)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)
    for k in range(3):
        np.testing.assert_allclose(ort_rt.predict(batch, force_exit=k).probs,
                                   torch_rt.predict(batch, force_exit=k).probs, atol=1e-5)
    np.testing.assert_allclose(ort_rt.predict(batch, full_depth=True).probs,
                               torch_rt.predict(batch, full_depth=True).probs, atol=1e-5)
    one = torch_rt.predict(batch[:1])
    assert one.exit_index[0] == a.exit_index[0]


def test_torch_backend_needs_programs(mlp_bundle):
    with pytest.raises(BundleError, match=r"no torch\.export programs"):
        get_backend("torch", mlp_bundle)


def test_torch_backend_options(conv_bundle):
    with pytest.raises(ConfigError, match="cuda_graphs"):
        get_backend("torch", conv_bundle, cuda_graphs=True)
    with pytest.raises(ConfigError, match="fp16 applies to backend tensorrt"):
        get_backend("torch", conv_bundle, fp16=True)
    with pytest.raises(ConfigError, match="GPU index"):
        get_backend("torch", conv_bundle, device="tpu")
    assert get_backend("torch", conv_bundle, device="cpu").device.type == "cpu"
    if not torch.cuda.is_available():
        for device in ("cuda", 0, "1", "cuda:0"):
            with pytest.raises(BackendUnavailableError, match="sees no CUDA GPU"):
                get_backend("torch", conv_bundle, device=device)


def test_cuda_graph_buckets():
    assert buckets(1) == [1]
    assert buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets(48) == [1, 2, 4, 8, 16, 32, 48]


class _ReplayOnCpu:
    """Stands in for a captured CUDA graph: replay() recomputes the static outputs from the static input."""

    def __init__(self, fn, static_in, static_out):
        self.fn, self.static_in, self.static_out, self.replays = fn, static_in, static_out, 0

    def replay(self):
        out = self.fn(self.static_in)
        pairs = zip(self.static_out, out, strict=True) if isinstance(out, tuple | list) else [(self.static_out, out)]
        for dst, src in pairs:
            dst.copy_(src)
        self.replays += 1


def test_bucketed_graph_replay_pads_and_slices(conv_bundle, batch):
    """The CUDA-graph call path (bucket choice, padding, slicing, eager above the largest bucket) on the CPU."""
    ref_rt = EarlyExitRuntime(conv_bundle)
    tau = tiny.mid_threshold(ref_rt.predict(batch, force_exit=0).probs.max(axis=1), 0.5)
    rt = EarlyExitRuntime(conv_bundle, backend="torch", threshold=tau)
    b = rt.backend
    b.cuda_graphs, b._buckets = True, buckets(16)
    graphs = {}
    with torch.inference_mode():
        for k, shape in b._input_shapes():
            fn = b._full if k == -1 else b._stages[k]
            for size in b._buckets:
                static_in = torch.full((size, *shape), 7.0)  # stale rows: must not leak into results
                static_out = fn(static_in)
                graphs[(k, size)] = (_ReplayOnCpu(fn, static_in, static_out), static_in, static_out)
    b._graphs = graphs
    for n in (1, 3, 16, 40):  # 40 > largest bucket: eager
        x = batch[:n]
        want = EarlyExitRuntime(conv_bundle, threshold=tau).predict(x)
        got = rt.predict(x)
        np.testing.assert_array_equal(got.exit_index, want.exit_index)
        np.testing.assert_allclose(got.probs, want.probs, atol=1e-5)
        np.testing.assert_allclose(rt.predict(x, full_depth=True).probs, ref_rt.predict(x, full_depth=True).probs,
                                   atol=1e-5)
    assert graphs[(0, 4)][0].replays > 0 and graphs[(-1, 16)][0].replays > 0
    assert b.graph_count == len(b._input_shapes()) * len(b._buckets)

"""ONNX Runtime backends: the embedded gather graph, install detection and the GPU backend's session set-up
(against a fake CUDA provider, since no GPU is here)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnxruntime as ort
import pytest

from mexit.errors import BackendUnavailableError, ConfigError
from mexit.runtime import backends
from mexit.runtime.backends import GATHER_MODEL, OrtGpuBackend, ort_install_problem

_RealSession = ort.InferenceSession


def test_embedded_gather_graph_is_the_onnx_built_one_and_compacts_rows():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, None)
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Gather", ["data", "idx"], ["out"], axis=0)], "gather",
                              [data, idx], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    assert model.SerializeToString() == GATHER_MODEL  # rank-free data input: one graph serves every stage
    assert onnx.load_from_string(GATHER_MODEL).graph.node[0].op_type == "Gather"
    sess = ort.InferenceSession(GATHER_MODEL, providers=["CPUExecutionProvider"])
    x = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    rows = np.array([0, 2, 3, 5], dtype=np.int64)
    np.testing.assert_array_equal(sess.run(None, {"data": x, "idx": rows})[0], x[rows])


def test_install_problems_are_named():
    assert "both onnxruntime and onnxruntime-gpu" in ort_install_problem(["onnxruntime", "onnxruntime-gpu"])
    assert "CPU build" in ort_install_problem(["onnxruntime"])
    assert ort_install_problem(["onnxruntime-gpu"]) is None


class _FakeCudaSession:
    """A real CPU session that reports the providers a GPU box would (or a fall-back), and records options."""

    created: ClassVar[list[dict]] = []
    fallback: ClassVar[bool] = False  # True: report what ORT does when the CUDA libraries cannot be loaded

    def __init__(self, model, so=None, providers=None):
        self._inner = _RealSession(model, so, providers=["CPUExecutionProvider"])
        type(self).created.append({"model": model, "providers": providers})
        self._providers = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        self.fallback_disabled = False

    def get_providers(self):
        return ["CPUExecutionProvider"] if type(self).fallback else self._providers

    def disable_fallback(self):
        self.fallback_disabled = True

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.fixture
def fake_cuda(monkeypatch):
    _FakeCudaSession.created = []
    _FakeCudaSession.fallback = False
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _FakeCudaSession)
    return _FakeCudaSession


def test_gpu_backend_session_options(fake_cuda, conv_bundle):
    b = OrtGpuBackend(conv_bundle, device=1, threads=2)
    assert b.device_id == 1
    stage_chains = [c["providers"] for c in fake_cuda.created if not isinstance(c["model"], bytes)]
    assert len(stage_chains) == 4  # 3 stages + full
    name, opts = stage_chains[0][0]
    assert name == "CUDAExecutionProvider"
    assert opts == {"device_id": "1", "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
    assert stage_chains[0][-1] == "CPUExecutionProvider"
    gather = [c for c in fake_cuda.created if isinstance(c["model"], bytes)]
    assert len(gather) == 1 and gather[0]["model"] == GATHER_MODEL  # no onnx package needed at run time
    assert all(s.sess.fallback_disabled for s in b._stages)


def test_gpu_backend_tensorrt_provider(fake_cuda, conv_bundle, tmp_path):
    b = OrtGpuBackend(conv_bundle, provider="tensorrt", fp16=True, max_batch=32, tf32=True,
                      trt_cache_dir=str(tmp_path / "cache"), cudnn_conv_algo_search="exhaustive")
    assert b.max_batch == 32
    chain = fake_cuda.created[1]["providers"]  # stage 1: input is stage 0's features
    trt_name, trt_opts = chain[0]
    assert trt_name == "TensorrtExecutionProvider" and trt_opts["trt_fp16_enable"] == "True"
    assert trt_opts["trt_profile_max_shapes"] == "h0:32x4x8x8" and trt_opts["trt_profile_min_shapes"] == "h0:1x4x8x8"
    assert chain[1][1]["use_tf32"] == "1" and chain[1][1]["cudnn_conv_algo_search"] == "EXHAUSTIVE"
    assert (tmp_path / "cache").is_dir()


def test_gpu_backend_refuses_a_silent_cpu_fallback(fake_cuda, conv_bundle):
    fake_cuda.fallback = True
    with pytest.raises(BackendUnavailableError, match=r"fell back to CPUExecutionProvider for stage_0\.onnx"):
        OrtGpuBackend(conv_bundle)


def test_gpu_backend_option_errors(fake_cuda, conv_bundle):
    with pytest.raises(ConfigError, match="fp16 needs provider=tensorrt"):
        OrtGpuBackend(conv_bundle, fp16=True)
    with pytest.raises(ConfigError, match="cudnn_conv_algo_search must be one of"):
        OrtGpuBackend(conv_bundle, cudnn_conv_algo_search="fast")
    with pytest.raises(ConfigError, match="provider must be"):
        OrtGpuBackend(conv_bundle, provider="rocm")


def test_missing_cuda_provider_names_the_install_problem(monkeypatch, conv_bundle):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(backends, "ort_distributions", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(BackendUnavailableError) as info:
        OrtGpuBackend(conv_bundle)
    msg = str(info.value)
    assert "no CUDAExecutionProvider" in msg and "both onnxruntime and onnxruntime-gpu" in msg
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in msg and "\n" not in msg



def test_folded_decision_matches_the_numpy_decision(conv_bundle, monkeypatch):
    """Softmax and max probability computed inside the stage graphs give the numpy path's exits and
    probabilities; without the onnx package (an edge box) the backend quietly keeps the numpy path."""
    import sys

    from mexit.runtime import EarlyExitRuntime
    from tests.export import tiny

    x = tiny.conv_inputs(64, seed=9)
    numpy_rt = EarlyExitRuntime(conv_bundle, fold_decision=False)
    tau = tiny.mid_threshold(numpy_rt.predict(x, force_exit=0).probs.max(axis=1), 0.5)
    numpy_rt = EarlyExitRuntime(conv_bundle, threshold=tau, fold_decision=False)
    folded = EarlyExitRuntime(conv_bundle, threshold=tau)
    assert folded.backend.folds_decision and folded._scored and not numpy_rt._scored
    want = numpy_rt.predict(x)
    assert len(np.unique(want.exit_index)) == 3
    got = folded.predict(x)
    np.testing.assert_array_equal(got.exit_index, want.exit_index)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    for i in range(0, 64, 7):
        one = folded.predict(x[i : i + 1])
        assert one.exit_index[0] == want.exit_index[i]
        np.testing.assert_allclose(one.probs[0], want.probs[i], atol=1e-6)
    for k in range(3):
        np.testing.assert_allclose(folded.predict(x, force_exit=k).probs, numpy_rt.predict(x, force_exit=k).probs,
                                   atol=1e-6)
    features, probs, conf = folded.backend.run_stage_scored(0, x[:5])
    assert features.shape == (5, 4, 8, 8)
    np.testing.assert_allclose(conf, probs.max(axis=1), rtol=0, atol=0)
    assert not EarlyExitRuntime(conv_bundle, policy="entropy", threshold=0.5)._scored  # numpy path for entropy
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert not EarlyExitRuntime(conv_bundle).backend.folds_decision


def test_single_graph_batch1_matches_the_chain(conv_bundle, mlp_bundle, monkeypatch):
    """Batch 1 through one graph with nested If nodes gives the per-stage chain's exits and probabilities,
    natural and forced; batches, the entropy policy and boxes without onnx keep the chain."""
    import sys

    from mexit.runtime import EarlyExitRuntime, backends
    from tests.export import tiny

    x = tiny.conv_inputs(48, seed=13)
    chain = EarlyExitRuntime(conv_bundle, fold_decision=False, single_graph=False)
    tau = tiny.mid_threshold(chain.predict(x, force_exit=0).probs.max(axis=1), 0.5)
    chain = EarlyExitRuntime(conv_bundle, threshold=tau, fold_decision=False, single_graph=False)
    one = EarlyExitRuntime(conv_bundle, threshold=tau)
    assert one.backend.has_single_graph and one._one is not None and chain._one is None
    calls: list[int] = []
    inner = one._one
    one._one = lambda xi, taus: calls.append(1) or inner(xi, taus)
    want = chain.predict(x)
    assert len(np.unique(want.exit_index)) == 3
    tiny.assert_batch1_matches(one, x, want)
    assert len(calls) == len(x)
    for k in range(3):
        for i in (0, 7, 21):
            np.testing.assert_allclose(one.predict(x[i : i + 1], force_exit=k).probs,
                                       chain.predict(x[i : i + 1], force_exit=k).probs, atol=1e-6)
            assert one.predict(x[i : i + 1], force_exit=k).exit_index[0] == k
    calls.clear()
    np.testing.assert_array_equal(one.predict(x).exit_index, want.exit_index)  # a batch: the chain
    assert calls == []
    for extreme, exit_k in ((0.0, 0), (1.01, 2)):
        assert EarlyExitRuntime(conv_bundle, threshold=extreme).predict(x[:1]).exit_index[0] == exit_k
    assert EarlyExitRuntime(mlp_bundle)._one is None  # entropy policy (the mlp bundle's): per-stage chain
    monkeypatch.setattr(backends, "SINGLE_GRAPH_MAX_BYTES", 0)
    assert not EarlyExitRuntime(conv_bundle).backend.has_single_graph  # auto: too large to duplicate
    assert EarlyExitRuntime(conv_bundle, single_graph=True).backend.has_single_graph
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert not EarlyExitRuntime(conv_bundle, single_graph=True).backend.has_single_graph

"""The TensorRT backend and engine builder against fake ``tensorrt`` / cuda-python modules (tests/runtime/fake_gpu.py).

The fakes run the bundle's ONNX graphs with ONNX Runtime on the CPU behind TensorRT's API, so these tests
check what the real GPU cannot be asked here: device-buffer offsets in compaction with scattered
survivors, engine-set lookup (GPU name, TensorRT version, FP16/FP32), TensorRT 10 vs 11 FP16 builds,
output shape checks, the batch split above max_batch and the per-thread CUDA device.
"""

from __future__ import annotations

import shutil
import sys
import threading

import numpy as np
import pytest

from mexit.bundle import load_bundle
from mexit.errors import BackendUnavailableError, BundleError, ConfigError
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.tensorrt_backend import GATHER_MIN_RUNS, TensorRTBackend, row_runs, select_engines
from tests.export import tiny
from tests.runtime import fake_gpu


@pytest.fixture
def bundle_copy(conv_bundle, tmp_path):
    """A private copy of the conv bundle (engine builds rewrite its manifest)."""
    return shutil.copytree(conv_bundle, tmp_path / "bundle")


@pytest.fixture(scope="module")
def batch():
    return tiny.conv_inputs(48, seed=11)


@pytest.fixture(scope="module")
def tau(conv_bundle, batch):
    return tiny.mid_threshold(EarlyExitRuntime(conv_bundle).predict(batch, force_exit=0).probs.max(axis=1), 0.5)


def _build(bundle, **kw):
    from mexit.export.tensorrt import build_engines

    return build_engines(bundle, **kw)


def test_row_runs():
    assert row_runs(np.array([], dtype=np.int64)) == []
    assert row_runs(np.array([3])) == [(3, 1)]
    assert row_runs(np.array([0, 1, 2, 5, 7, 8, 11])) == [(0, 3), (5, 1), (7, 2), (11, 1)]


def test_build_fp32_engines_then_chain_matches_onnxruntime(monkeypatch, bundle_copy, batch, tau):
    trt, cudart = fake_gpu.install(monkeypatch)
    out = _build(bundle_copy, max_batch=64)
    m = load_bundle(bundle_copy).manifest
    key = "Fake-GPU-X_trt10.9.0"
    assert out.name == key and set(m.engines) == {key}
    info = m.engines[key]
    assert info["fp16"] is False and info["tf32"] is False and info["max_batch"] == 64
    assert len(trt.builds) == 4  # 3 stages + full
    assert all("TF32" not in b["flags"] and "FP16" not in b["flags"] for b in trt.builds)  # TF32 off for parity
    assert all(b["profile"]["input" if "input" in b["profile"] else next(iter(b["profile"]))][1][0] == 1
               for b in trt.builds)  # opt batch 1
    assert len({id(c) for c in trt.timing_caches}) == 1 and len(trt.timing_caches) == 4  # one cache shared

    ref = EarlyExitRuntime(bundle_copy, threshold=tau).predict(batch)
    assert len(np.unique(ref.exit_index)) == 3
    rt = EarlyExitRuntime(bundle_copy, backend="tensorrt", threshold=tau, threads=4)
    assert rt.backend.max_batch == 64 and rt.backend.engine_key == key
    got = rt.predict(batch)
    np.testing.assert_array_equal(got.exit_index, ref.exit_index)
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-6)
    # scattered survivors: the gather kernel for many runs, one copy per run of consecutive rows otherwise
    survivors0 = np.flatnonzero(ref.exit_index > 0)
    survivors1 = np.flatnonzero(ref.exit_index[survivors0] > 1)
    runs = [len(row_runs(s)) for s in (survivors0, survivors1)]
    assert max(runs) > GATHER_MIN_RUNS, runs  # the batch exercises the kernel path
    assert len(cudart.driver.launches) == sum(r > GATHER_MIN_RUNS for r in runs)
    assert rt.backend.copies == sum(r for r in runs if r <= GATHER_MIN_RUNS)
    assert [n for n, _ in cudart.driver.launches] == [len(s) for s, r in zip((survivors0, survivors1), runs,
                                                                             strict=True) if r > GATHER_MIN_RUNS]
    full = rt.predict(batch, full_depth=True)
    np.testing.assert_allclose(full.probs, EarlyExitRuntime(bundle_copy).predict(batch, full_depth=True).probs,
                               atol=1e-6)
    rt.close()
    assert cudart.allocs == {}


@pytest.mark.parametrize("kernel", [True, False])
def test_compaction_paths_agree(monkeypatch, bundle_copy, batch, tau, kernel):
    """Per-run copies (no NVRTC, or gather_kernel=False) and the gather kernel give the same results."""
    _, cudart = fake_gpu.install(monkeypatch, nvrtc=kernel)
    _build(bundle_copy, max_batch=64)
    rt = EarlyExitRuntime(bundle_copy, backend="tensorrt", threshold=tau)
    ref = EarlyExitRuntime(bundle_copy, threshold=tau).predict(batch)
    got = rt.predict(batch)
    np.testing.assert_array_equal(got.exit_index, ref.exit_index)
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-6)
    assert (len(cudart.driver.launches) > 0) == kernel and (kernel or rt.backend.copies > 0)
    off = EarlyExitRuntime(bundle_copy, backend="tensorrt", threshold=tau, gather_kernel=False)
    np.testing.assert_allclose(off.predict(batch).probs, ref.probs, atol=1e-6)


def test_batches_above_max_batch_are_split(monkeypatch, bundle_copy, batch, tau):
    trt, _ = fake_gpu.install(monkeypatch)
    _build(bundle_copy, max_batch=8)
    rt = EarlyExitRuntime(bundle_copy, backend="tensorrt", threshold=tau)
    got = rt.predict(batch)  # 48 rows through engines that take 8
    ref = EarlyExitRuntime(bundle_copy, threshold=tau).predict(batch)
    np.testing.assert_array_equal(got.exit_index, ref.exit_index)
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-6)
    seen = [s[0] for e in trt.engines for c in e.contexts for s in c.input_shapes_seen]
    assert max(seen) == 8 and min(seen) >= 1


def test_fp16_engines_are_served_with_fp16_only(monkeypatch, bundle_copy, batch, tau):
    fake_gpu.install(monkeypatch)
    _build(bundle_copy, fp16=True, max_batch=16)
    assert set(load_bundle(bundle_copy).manifest.engines) == {"Fake-GPU-X_trt10.9.0_fp16"}
    with pytest.raises(BackendUnavailableError, match=r"only FP16 .*with --fp16.*--engines-only --engine tensorrt`"):
        EarlyExitRuntime(bundle_copy, backend="tensorrt")
    rt = EarlyExitRuntime(bundle_copy, backend="tensorrt", fp16=True, threshold=tau)
    assert rt.backend.engine_key.endswith("_fp16")
    np.testing.assert_array_equal(rt.predict(batch).exit_index,
                                  EarlyExitRuntime(bundle_copy, threshold=tau).predict(batch).exit_index)


def test_engines_for_another_gpu_or_version_are_refused(monkeypatch, bundle_copy):
    fake_gpu.install(monkeypatch, gpus=("Fake GPU Y",))
    _build(bundle_copy, max_batch=4)
    fake_gpu.install(monkeypatch, gpus=("Fake GPU X",))
    with pytest.raises(BackendUnavailableError, match=r"FP32 for Fake GPU Y / TensorRT 10\.9\.0 but none for Fake GPU X"
                       ):
        EarlyExitRuntime(bundle_copy, backend="tensorrt")
    # same GPU name, other TensorRT: the plan cannot be deserialised
    fake_gpu.install(monkeypatch, version="10.10.0", gpus=("Fake GPU Y",))
    with pytest.raises(BackendUnavailableError, match=r"none for Fake GPU Y / TensorRT 10\.10\.0"):
        EarlyExitRuntime(bundle_copy, backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="could not load"):
        EarlyExitRuntime(bundle_copy, backend="tensorrt", engine_key="Fake-GPU-Y_trt10.9.0")


def test_select_engines_messages():
    engines = {"A_trt10.1": {"gpu": "A", "tensorrt": "10.1", "fp16": False}}
    key, info = select_engines(engines, gpu="A", trt_version="10.1", fp16=False, bundle_path="B")
    assert key == "A_trt10.1" and info["gpu"] == "A"
    with pytest.raises(BackendUnavailableError, match=r"only FP32 .* FP16 asked.*without --fp16.*--fp16`"):
        select_engines(engines, gpu="A", trt_version="10.1", fp16=True, bundle_path="B")
    with pytest.raises(BackendUnavailableError, match="has no TensorRT engines; build them on this machine"):
        select_engines({}, gpu="A", trt_version="10.1", fp16=False, bundle_path="B")
    with pytest.raises(BackendUnavailableError, match=r"mexit export B --engines-only --engine tensorrt`"):
        select_engines(engines, gpu="C", trt_version="10.1", fp16=False, bundle_path="B")


def test_output_shape_mismatch_is_caught(monkeypatch, bundle_copy):
    fake_gpu.install(monkeypatch)
    _build(bundle_copy, max_batch=4)
    rt = EarlyExitRuntime(bundle_copy, backend="tensorrt", threshold=1.01)
    ctx = rt.backend._stages[1]["ctx"]
    real = ctx.get_tensor_shape
    monkeypatch.setattr(ctx, "get_tensor_shape", lambda name: (*real(name)[:-1], real(name)[-1] + 1))
    with pytest.raises(BundleError, match="shape"):
        rt.predict(tiny.conv_inputs(2))


def test_device_is_made_current_on_every_thread(monkeypatch, bundle_copy, batch, tau):
    _, cudart = fake_gpu.install(monkeypatch, gpus=("Fake GPU X", "Fake GPU X"))
    _build(bundle_copy, max_batch=64, device_id=1)
    rt = EarlyExitRuntime(bundle_copy, backend="tensorrt", device=1, threshold=tau)
    ref = rt.predict(batch)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("p", rt.predict(batch)), name="pool-1")
    worker.start()
    worker.join()
    np.testing.assert_array_equal(out["p"].exit_index, ref.exit_index)  # the fake raises on a wrong device
    assert ("pool-1", 1) in cudart.set_device_calls
    with pytest.raises(BackendUnavailableError, match="no GPU 2"):
        EarlyExitRuntime(bundle_copy, backend="tensorrt", device=2)
    with pytest.raises(ConfigError, match="GPU index"):
        EarlyExitRuntime(bundle_copy, backend="tensorrt", device="tpu")


def test_old_tensorrt_is_refused(monkeypatch, conv_bundle):
    fake_gpu.install(monkeypatch, version="8.6.1")
    with pytest.raises(BackendUnavailableError, match=r"TensorRT 8\.6\.1 is too old"):
        TensorRTBackend(conv_bundle)
    from mexit.export.tensorrt import check_build_support

    with pytest.raises(BackendUnavailableError, match="too old"):
        check_build_support(fp16=False)


def test_missing_tensorrt_or_cuda_python_is_explained(monkeypatch, conv_bundle):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, whatever is installed
    with pytest.raises(BackendUnavailableError, match=r"pip install mexit\[tensorrt\]"):
        EarlyExitRuntime(conv_bundle, backend="tensorrt")
    fake_gpu.install(monkeypatch)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(BackendUnavailableError, match="cuda-python is not importable"):
        EarlyExitRuntime(conv_bundle, backend="tensorrt")


def test_no_gpu_is_explained(monkeypatch, conv_bundle):
    fake_gpu.install(monkeypatch, gpus=())
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU is usable"):
        EarlyExitRuntime(conv_bundle, backend="tensorrt")

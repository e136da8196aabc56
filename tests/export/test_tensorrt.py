"""Engine building (mexit.export.tensorrt, `mexit export --engine tensorrt`) against the fake TensorRT/cuda-python
modules of tests/runtime/fake_gpu.py: TensorRT 10 vs 11 FP16, TF32 off, shared timing cache, checks before work."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from mexit.bundle import load_bundle
from mexit.errors import BackendUnavailableError
from mexit.export import export_bundle
from mexit.runtime import EarlyExitRuntime
from tests.export import tiny
from tests.runtime import fake_gpu


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "conv"
    return export_bundle(tiny.tiny_conv(seed=2), out, sample_inputs=tiny.conv_inputs(16, seed=4), threshold=0.8,
                         dataset_name="toy", dataset_kind="image", exporter="legacy", save_torch_programs=False)


@pytest.fixture
def bundle_copy(exported, tmp_path):
    return shutil.copytree(exported, tmp_path / "bundle")


def _build(bundle, **kw):
    from mexit.export.tensorrt import build_engines

    return build_engines(bundle, **kw)


def test_tensorrt10_fp16_uses_the_builder_flag(monkeypatch, bundle_copy):
    import mexit.export.tensorrt as builder

    trt, _ = fake_gpu.install(monkeypatch, version="10.9.0")
    assert builder.fp16_mode(trt) == "flag"
    _build(bundle_copy, fp16=True, max_batch=8, opt_batch=4)
    assert all("FP16" in b["flags"] and b["network_flags"] == 0 for b in trt.builds)
    assert all(shape[1][0] == 4 and shape[2][0] == 8 for b in trt.builds for shape in b["profile"].values())
    info = load_bundle(bundle_copy).manifest.engines["Fake-GPU-X_trt10.9.0_fp16"]
    assert info["fp16_mode"] == "flag" and info["opt_batch"] == 4


def test_tf32_is_off_unless_asked(monkeypatch, bundle_copy):
    trt, _ = fake_gpu.install(monkeypatch)
    _build(bundle_copy, tf32=True)
    assert all("TF32" in b["flags"] for b in trt.builds)
    assert load_bundle(bundle_copy).manifest.engines["Fake-GPU-X_trt10.9.0"]["tf32"] is True


def test_tensorrt11_fp16_builds_a_strongly_typed_network(monkeypatch, bundle_copy):
    import mexit.export.tensorrt as builder

    trt, _ = fake_gpu.install(monkeypatch, version="11.1.0")
    assert builder.fp16_mode(trt) == "strongly-typed"
    monkeypatch.setattr(builder, "_fp16_converter", lambda: None)
    with pytest.raises(BackendUnavailableError, match="onnxconverter-common"):
        _build(bundle_copy, fp16=True)
    assert trt.builds == [] and load_bundle(bundle_copy).manifest.engines == {}  # refused before any work
    converted: list[str] = []

    def fake_cast(path):  # stands in for the FP16 cast (keep_io_types): the graph itself is what we pass on
        import onnx

        converted.append(path.name)
        return onnx.load(str(path))

    monkeypatch.setattr(builder, "_fp16_converter", lambda: fake_cast)
    _build(bundle_copy, fp16=True, max_batch=4)
    assert converted == ["stage_0.onnx", "stage_1.onnx", "stage_2.onnx", "full.onnx"]
    assert all(b["network_flags"] == 1 << 5 and "FP16" not in b["flags"] for b in trt.builds)
    info = load_bundle(bundle_copy).manifest.engines["Fake-GPU-X_trt11.1.0_fp16"]
    assert info["fp16_mode"] == "strongly-typed"
    EarlyExitRuntime(bundle_copy, backend="tensorrt", fp16=True).predict(tiny.conv_inputs(3))


def test_cli_builds_engines_into_an_existing_bundle(monkeypatch, bundle_copy):
    from mexit.cli.export import command

    fake_gpu.install(monkeypatch)
    res = CliRunner().invoke(command, [str(bundle_copy), "--engines-only", "--engine", "tensorrt", "--fp16",
                                       "--max-batch", "8"])
    assert res.exit_code == 0, res.output
    assert set(load_bundle(bundle_copy).manifest.engines) == {"Fake-GPU-X_trt10.9.0_fp16"}
    res = CliRunner().invoke(command, [str(bundle_copy), "--engines-only", "--engine", "tensorrt", "--fp16"])
    assert res.exit_code != 0 and "--overwrite" in str(res.exception)


def test_cli_checks_tensorrt_cuda_and_gpu_before_any_export(monkeypatch, tmp_path):
    """A long export must not start when engines cannot be built here (no GPU, no converter, no cuda-python)."""
    import sys

    import mexit.export.tensorrt as builder
    import mexit.train.runner as runner
    from mexit.cli.export import command

    monkeypatch.setattr(runner, "load_run", lambda *a, **k: pytest.fail("export started before the checks"))
    args = [str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--engine", "tensorrt"]
    fake_gpu.install(monkeypatch, gpus=())
    res = CliRunner().invoke(command, args)
    assert isinstance(res.exception, BackendUnavailableError) and "no CUDA GPU" in str(res.exception)
    fake_gpu.install(monkeypatch, version="11.0.0")
    monkeypatch.setattr(builder, "_fp16_converter", lambda: None)
    res = CliRunner().invoke(command, [*args, "--fp16"])
    assert isinstance(res.exception, BackendUnavailableError) and "FP16 ONNX graph" in str(res.exception)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    res = CliRunner().invoke(command, args)
    assert isinstance(res.exception, BackendUnavailableError) and "cuda-python" in str(res.exception)
    res = CliRunner().invoke(command, [str(tmp_path / "run"), "--engines-only"])
    assert "--engine tensorrt" in str(res.exception)

"""The backend registry: one list of names, one set of common options, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from mexit.errors import ConfigError
from mexit.runtime import (
    BACKENDS,
    COMMON_OPTIONS,
    EarlyExitRuntime,
    OrtCpuBackend,
    backend_names,
    backend_spec,
    describe_backends,
    get_backend,
    parse_backend_options,
    register_backend,
    registry,
)
from tests.export import tiny


def test_names_come_from_the_registry():
    assert backend_names() == BACKENDS == ("onnxruntime", "onnxruntime-gpu", "tensorrt", "torch")
    text = describe_backends()
    assert all(line.split(":")[0] in BACKENDS for line in text.splitlines()) and len(text.splitlines()) == 4


@pytest.mark.parametrize("name", ["onnxruntime", "onnxruntime-gpu", "tensorrt", "torch"])
def test_every_backend_takes_the_common_options(name):
    spec = backend_spec(name)
    assert spec.options[:3] == COMMON_OPTIONS
    assert spec.cls.name == name


def test_unknown_backend_and_option_are_one_line_with_the_valid_ones(conv_bundle):
    with pytest.raises(ConfigError, match=r"unknown backend 'tflite'; use one of onnxruntime, onnxruntime-gpu, "):
        EarlyExitRuntime(conv_bundle, backend="tflite")
    with pytest.raises(ConfigError, match=r"takes no option 'cuda_graphs'; its options are threads, device, fp16, "
                                          r"spinning, fold_decision"):
        get_backend("onnxruntime", conv_bundle, cuda_graphs=True)
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        EarlyExitRuntime(conv_bundle, threads=0)
    with pytest.raises(ConfigError, match="fp16 must be true or false"):
        EarlyExitRuntime(conv_bundle, backend="tensorrt", fp16="yes")


def test_cpu_backend_refuses_gpu_options(conv_bundle):
    with pytest.raises(ConfigError, match=r"runs on the CPU; device=1 needs a GPU backend"):
        EarlyExitRuntime(conv_bundle, device=1)
    with pytest.raises(ConfigError, match="no FP16 mode"):
        EarlyExitRuntime(conv_bundle, fp16=True)
    rt = EarlyExitRuntime(conv_bundle, device="cpu", fp16=False, threads=2)
    assert rt.backend.options["threads"] == 2


@pytest.mark.parametrize(
    ("name", "opts", "needle"),
    [
        ("onnxruntime", {"device": 0}, "runs on the CPU; device=0 needs a GPU backend"),
        ("onnxruntime", {"fp16": True}, "no FP16 mode"),
        ("onnxruntime-gpu", {"provider": "rocm"}, "provider must be 'cuda' or 'tensorrt'"),
        ("onnxruntime-gpu", {"fp16": True}, "fp16 needs provider=tensorrt"),
        ("onnxruntime-gpu", {"cudnn_conv_algo_search": "fast"}, "cudnn_conv_algo_search must be one of"),
        ("onnxruntime-gpu", {"max_batch": 0}, "max_batch must be an integer >= 1"),
        ("onnxruntime-gpu", {"device": "gpu-a"}, "device must be a GPU index"),
        ("tensorrt", {"device": -1}, "device must be a GPU index >= 0"),
        ("torch", {"fp16": True}, "fp16 applies to backend tensorrt"),
        ("torch", {"cuda_graphs": True}, "cuda_graphs=True needs a GPU device"),
        ("torch", {"cuda_graph_max_batch": 0}, "cuda_graph_max_batch must be an integer >= 1"),
        ("torch", {"device": "tpu"}, "device must be a GPU index"),
    ],
)
def test_option_values_are_refused_before_anything_loads(name, opts, needle):
    """The backends' own static rules run in check_options: no bundle, package or device is needed to refuse them
    (so an audit config or `mexit serve --backend-opt` fails at once, not after minutes of work)."""
    with pytest.raises(ConfigError, match=needle) as info:
        registry.check_options(name, opts)
    assert "\n" not in str(info.value)


def test_valid_option_values_pass_the_static_rules():
    assert registry.check_options("onnxruntime", {"device": "cpu", "fp16": False}) == {"device": "cpu", "fp16": False}
    assert registry.check_options("onnxruntime-gpu", {"provider": "tensorrt", "fp16": True, "device": "cuda:1"})
    assert registry.check_options("torch", {"device": "cpu"}) and registry.check_options("torch", {"device": 0})
    assert registry.check_options("tensorrt", {"device": "0", "fp16": True})


def test_deprecated_intra_op_threads_alias(conv_bundle):
    with pytest.warns(DeprecationWarning, match="intra_op_threads"):
        rt = EarlyExitRuntime(conv_bundle, intra_op_threads=3)
    assert rt.backend.options["threads"] == 3
    with pytest.raises(ConfigError, match="disagree"):
        EarlyExitRuntime(conv_bundle, intra_op_threads=3, threads=2)


def test_ready_backend_object_takes_no_options(conv_bundle):
    backend = get_backend("onnxruntime", conv_bundle)
    with pytest.raises(ConfigError, match="ready backend object"):
        EarlyExitRuntime(conv_bundle, backend=backend, threads=2)


def test_parse_backend_options_coerces_to_the_option_types():
    assert parse_backend_options("onnxruntime-gpu", ["provider=tensorrt", "max_batch=64", "tf32=true",
                                                     "fp16=0", "device=1", "threads=2"]) == {
        "provider": "tensorrt", "max_batch": 64, "tf32": True, "fp16": False, "device": 1, "threads": 2}
    assert parse_backend_options("torch", ["device=cuda:1", "cuda-graphs=yes"]) == {"device": "cuda:1",
                                                                                     "cuda_graphs": True}
    assert parse_backend_options("onnxruntime", ["intra_op_threads=4"]) == {"threads": 4}
    # an option whose default is None ("auto") takes its annotation's type, not a truthy string
    assert parse_backend_options("onnxruntime", ["single_graph=false"]) == {"single_graph": False}
    assert parse_backend_options("onnxruntime", ["single_graph=none"]) == {"single_graph": None}
    with pytest.raises(ConfigError, match="key=value"):
        parse_backend_options("onnxruntime", ["int8_heads"])
    with pytest.raises(ConfigError, match="takes no option 'provider'"):
        parse_backend_options("onnxruntime", ["provider=cuda"])
    with pytest.raises(ConfigError, match="takes an integer"):
        parse_backend_options("onnxruntime-gpu", ["max_batch=lots"])
    with pytest.raises(ConfigError, match="true/false"):
        parse_backend_options("onnxruntime", ["int8_heads=maybe"])


def test_gpu_index_forms():
    assert registry.gpu_index("x", None) == 0
    assert registry.gpu_index("x", 2) == registry.gpu_index("x", "2") == registry.gpu_index("x", "cuda:2") == 2
    assert registry.gpu_index("x", "cuda") == 0
    for bad in ("cpu", -1, True, "gpu0"):
        with pytest.raises(ConfigError):
            registry.gpu_index("x", bad)


def test_a_new_backend_is_one_class_and_its_registration(conv_bundle):
    """What adding e.g. OpenVINO costs: a class taking the common options, decorated; nothing else."""

    @register_backend("test-echo", description="ONNX Runtime CPU under another name (test only)")
    class Echo(OrtCpuBackend):
        def __init__(self, bundle, *, threads=1, device=None, fp16=False, note: str = "") -> None:
            super().__init__(bundle, threads=threads, device=device, fp16=fp16)
            self.note = note

    try:
        assert "test-echo" in backend_names()
        rt = EarlyExitRuntime(conv_bundle, backend="test-echo", note="hi", threads=1)
        assert rt.backend.note == "hi" and rt.backend.name == "test-echo"
        x = tiny.conv_inputs(5)
        np.testing.assert_allclose(rt.predict(x).probs, EarlyExitRuntime(conv_bundle).predict(x).probs)
        with pytest.raises(ValueError, match="already registered"):
            register_backend("test-echo", description="again")(OrtCpuBackend)
        with pytest.raises(TypeError, match="common options"):
            register_backend("test-bad", description="no common options")(type("Bad", (), {"__init__": lambda s: None}))
    finally:
        registry._REGISTRY.pop("test-echo", None)
        registry._REGISTRY.pop("test-bad", None)

"""The blocked-layout rewrite of residual stages (mexit.runtime.layout): same values, fewer reorders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from mexit.runtime import EarlyExitRuntime
from mexit.runtime.layout import SKIP_CONV_SUFFIX, route_skips_through_conv


def _residual_graph(channels: int = 16, *, dims: tuple = ("batch", 16, 8, 8)) -> onnx.ModelProto:
    """``x → conv → relu → conv → add(·, x) → relu → conv → add(·, ·) → relu``: a stage cut inside a residual
    group, its input being the first block's skip."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for k in range(3):
        w = rng.normal(0, 0.2, (channels, channels, 3, 3)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{k}"))
    nodes += [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
              helper.make_node("Relu", ["c0"], ["r0"]),
              helper.make_node("Conv", ["r0", "w1"], ["c1"], pads=[1, 1, 1, 1]),
              helper.make_node("Add", ["c1", "x"], ["a1"]),
              helper.make_node("Relu", ["a1"], ["r1"]),
              helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
              helper.make_node("Add", ["c2", "r1"], ["a2"]),
              helper.make_node("Relu", ["a2"], ["y"])]
    graph = helper.make_graph(nodes, "stage", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_skip_read_from_the_stage_input_goes_through_an_identity_conv_with_the_same_values(tmp_path: Path) -> None:
    model = _residual_graph()
    x = np.abs(np.random.default_rng(1).normal(size=(4, 16, 8, 8))).astype(np.float32)  # post-ReLU features
    before = _run(model, x, tmp_path / "before.onnx")
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert route_skips_through_conv(rewritten) == 1
    onnx.checker.check_model(rewritten)
    add = next(n for n in rewritten.graph.node if n.op_type == "Add")
    assert list(add.input) == ["c1", "x" + SKIP_CONV_SUFFIX]
    assert next(n for n in rewritten.graph.node if n.op_type == "Conv" and n.output[0] == add.input[1]).input[0] == "x"
    after = _run(rewritten, x, tmp_path / "after.onnx")
    assert np.allclose(before, after, rtol=1e-5, atol=1e-5)

    def reorders(path: Path) -> int:  # what ONNX Runtime's NCHWc transformer made of the graph
        return sum(n.op_type in ("ReorderInput", "ReorderOutput") for n in onnx.load(str(path)).graph.node)

    # the point of it: without the rewrite each block is wrapped in layout conversions, with it one pair remains
    assert reorders(tmp_path / "after.onnx") < reorders(tmp_path / "before.onnx")


@pytest.mark.parametrize("dims", [("batch", 16), ("batch", "c", 8, 8)])
def test_inputs_that_are_not_feature_maps_of_known_width_are_left_alone(dims: tuple) -> None:
    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    assert route_skips_through_conv(model) == 0 and len(model.graph.node) == 1


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


def test_runtime_with_and_without_the_rewrite_decides_the_same(tmp_path: Path) -> None:
    from mexit.export import export_bundle
    from mexit.train.multiexit import MultiExitNet
    from tests.export import tiny

    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()), _Block(8), nn.Sequential(_Block(8), _Block(8))]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)) for _ in range(3)]
    with torch.no_grad():
        for h, s in zip(heads, (20.0, 40.0, 30.0), strict=True):
            h[2].weight.mul_(s)
    net = MultiExitNet(stages, heads, arch="tiny-res", input_shape=(1, 8, 8), num_classes=4).eval()
    x = tiny.conv_inputs(48, seed=3)
    with torch.no_grad():  # a threshold that half the samples meet at the first exit
        tau = float(torch.softmax(net(torch.from_numpy(x))[0], dim=1).max(dim=1).values.median())
    bundle = export_bundle(net, tmp_path / "b", sample_inputs=x[:16], threshold=tau, dataset_name="toy-images",
                           dataset_kind="image", exporter="legacy")
    on, off = EarlyExitRuntime(bundle, threads=1), EarlyExitRuntime(bundle, threads=1, skip_conv=False)
    assert on.backend.options["skip_conv"] and not off.backend.options["skip_conv"]
    a, b = on.predict(x), off.predict(x)
    assert len(np.unique(a.exit_index)) >= 2  # the check covers more than one exit
    assert np.array_equal(a.exit_index, b.exit_index) and np.allclose(a.probs, b.probs, atol=1e-5)
    for i in range(6):  # batch 1: the single early-exit graph, whose stages read their input from outside
        one = on.predict(x[i : i + 1])
        assert one.exit_index[0] == a.exit_index[i] and np.allclose(one.probs[0], a.probs[i], atol=1e-5)

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

from mexit.runtime import EarlyExitRuntime, parse_backend_options
from mexit.runtime.layout import (
    NCHWC_DOMAIN,
    SKIP_CONV_SUFFIX,
    _blocked_output,
    hand_over_blocked,
    ort_optimised,
    route_skips_through_conv,
)


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


def _session(model: onnx.ModelProto, optimized: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: Path | None = None) -> np.ndarray:
    return _session(model, optimized).run(None, {"x": x})[0]


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


def _residual_bundle(out: Path, channels: int) -> tuple[Path, np.ndarray]:
    """A 3-exit residual bundle (stages 1 and 2 start inside a residual group) and 48 inputs for it."""
    from mexit.export import export_bundle
    from mexit.train.multiexit import MultiExitNet
    from tests.export import tiny

    torch.manual_seed(0)
    c = channels
    stages = [nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU()), _Block(c), nn.Sequential(_Block(c), _Block(c))]
    heads = [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4)) for _ in range(3)]
    with torch.no_grad():
        for h, s in zip(heads, (20.0, 40.0, 30.0), strict=True):
            h[2].weight.mul_(s)
    net = MultiExitNet(stages, heads, arch="tiny-res", input_shape=(1, 8, 8), num_classes=4).eval()
    x = tiny.conv_inputs(48, seed=3)
    with torch.no_grad():  # a threshold that half the samples meet at the first exit
        tau = float(torch.softmax(net(torch.from_numpy(x))[0], dim=1).max(dim=1).values.median())
    bundle = export_bundle(net, out, sample_inputs=x[:16], threshold=tau, dataset_name="toy-images",
                           dataset_kind="image", exporter="legacy")
    return bundle, x


def test_runtime_with_and_without_the_rewrite_decides_the_same(tmp_path: Path) -> None:
    bundle, x = _residual_bundle(tmp_path / "b", 8)
    on, off = EarlyExitRuntime(bundle, threads=1), EarlyExitRuntime(bundle, threads=1, skip_conv=False)
    assert on.backend.options["skip_conv"] and not off.backend.options["skip_conv"]
    a, b = on.predict(x), off.predict(x)
    assert len(np.unique(a.exit_index)) >= 2  # the check covers more than one exit
    assert np.array_equal(a.exit_index, b.exit_index) and np.allclose(a.probs, b.probs, atol=1e-5)
    for i in range(6):  # batch 1: the single early-exit graph, whose stages read their input from outside
        one = on.predict(x[i : i + 1])
        assert one.exit_index[0] == a.exit_index[i] and np.allclose(one.probs[0], a.probs[i], atol=1e-5)


def _stage_pair(channels: int) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Stage 0 ``x → conv → relu → y`` (an image in, features out) and stage 1, the residual graph reading them,
    its skip routed through the identity convolution as the runtime does."""
    w = numpy_helper.from_array(np.random.default_rng(2).normal(0, 0.3, (channels, 3, 3, 3)).astype(np.float32), "w")
    stem = helper.make_graph([helper.make_node("Conv", ["img", "w"], ["c"], pads=[1, 1, 1, 1]),
                              helper.make_node("Relu", ["c"], ["x"])], "stem",
                             [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", channels, 8, 8])],
                             initializer=[w])
    first = helper.make_model(stem, opset_imports=[helper.make_opsetid("", 17)])
    second = _residual_graph(channels, dims=("batch", channels, 8, 8))
    route_skips_through_conv(second)
    return first, second


def _chain(graphs: list[onnx.ModelProto], img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s0, s1 = (_session(g) for g in graphs)
    features = s0.run(None, {"img": img})[0]
    return features, s1.run(None, {"x": features})[0]


def _needs_blocked_layout(model: onnx.ModelProto) -> None:
    """Skip where ONNX Runtime has no blocked layout (a CPU without AVX2, an ARM machine): nothing to hand over."""
    if not any(n.domain == NCHWC_DOMAIN for n in ort_optimised(model).graph.node):
        pytest.skip("ONNX Runtime uses no blocked (NCHWc) layout on this CPU")


def test_blocked_handoff_removes_the_boundary_reorders_and_keeps_every_value(tmp_path: Path) -> None:
    first, second = _stage_pair(16)
    _needs_blocked_layout(first)
    img = np.random.default_rng(3).random((5, 3, 8, 8), dtype=np.float32)
    plain_features, plain_out = _chain([first, second], img)
    graphs, rewritten = hand_over_blocked([first, second], ["x", None], ["img", "x"])
    assert rewritten == 1
    ops = [[(n.domain, n.op_type) for n in g.graph.node] for g in graphs]
    assert (NCHWC_DOMAIN, "ReorderOutput") not in ops[0]  # stage 0 returns its blocked features as they are
    assert (NCHWC_DOMAIN, "ReorderInput") not in ops[1]  # and stage 1 reads them without converting
    assert not any(n.name.startswith("x" + SKIP_CONV_SUFFIX) for n in graphs[1].graph.node)  # identity skip gone
    blocked_features, out = _chain(graphs, img)
    assert blocked_features.shape == plain_features.shape
    assert np.array_equal(out, plain_out)  # a reorder only moves floats: bit-identical
    # the rows stay outermost: stage 1 on a subset of blocked rows is stage 1's answer for those rows
    s1 = _session(graphs[1])
    assert np.array_equal(s1.run(None, {"x": np.take(blocked_features, [4, 1], axis=0)})[0], plain_out[[4, 1]])
    # and the layouts must be paired: the blocked features are not the plain ones
    assert not np.array_equal(blocked_features, plain_features)


def test_boundaries_without_whole_blocks_or_convolutions_are_left_as_they_are() -> None:
    first, second = _stage_pair(8)  # 8 channels: a block on AVX2, half a block on AVX-512
    graphs, rewritten = hand_over_blocked([first, second], ["x", None], ["img", "x"])
    assert rewritten == 0 and graphs[0] is first and graphs[1] is second
    a, b = (helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4]) for name in "ab")
    dense = helper.make_model(helper.make_graph([helper.make_node("Relu", ["a"], ["b"])], "dense", [a], [b]),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert hand_over_blocked([dense, dense], ["b", None], ["a", "a"])[1] == 0


def test_a_feature_output_also_read_inside_its_stage_stays_plain() -> None:
    reorder = helper.make_node("ReorderOutput", ["blk"], ["feat"], domain=NCHWC_DOMAIN, channels=16)
    graph = helper.make_graph([reorder], "g", [], [])
    assert _blocked_output(graph, "feat") == reorder
    graph.node.append(helper.make_node("Relu", ["feat"], ["r"]))  # an NCHW reader would see blocked values
    assert _blocked_output(graph, "feat") is None


def test_runtime_with_the_blocked_handoff_decides_as_without(tmp_path: Path) -> None:
    _needs_blocked_layout(_stage_pair(16)[0])
    bundle, x = _residual_bundle(tmp_path / "b16", 16)
    on = EarlyExitRuntime(bundle, threads=1, batch_graph=True)
    off = EarlyExitRuntime(bundle, threads=1, **parse_backend_options("onnxruntime", ["blocked_handoff=false"]))
    assert on.backend.options["blocked_handoff"] and not off.backend.options["blocked_handoff"]
    a, b = on.predict(x), off.predict(x)
    assert len(np.unique(b.exit_index)) >= 2
    assert np.array_equal(a.exit_index, b.exit_index) and np.allclose(a.probs, b.probs, atol=1e-6)
    chain = EarlyExitRuntime(bundle, threads=1)  # the per-stage chain, rows compacted between stages
    unfolded = EarlyExitRuntime(bundle, threads=1, fold_decision=False)  # the decision in numpy between stages
    assert unfolded.backend.options["blocked_handoff"] and not unfolded.backend.options["fold_decision"]
    for c in (chain.predict(x), unfolded.predict(x)):
        assert np.array_equal(c.exit_index, b.exit_index) and np.allclose(c.probs, b.probs, atol=1e-6)
    for i in range(6):  # batch 1: the single early-exit graph, its If branches reading blocked features
        one = on.predict(x[i : i + 1])
        assert one.exit_index[0] == b.exit_index[i] and np.allclose(one.probs[0], b.probs[i], atol=1e-6)

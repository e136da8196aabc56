"""Int8 internal heads (mexit.runtime.quantize): which layers, how close, and per-sample exits kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from mexit.bundle import load_bundle
from mexit.runtime import EarlyExitRuntime, quantize
from mexit.runtime.registry import parse_backend_options
from tests.export import tiny

#: Smaller than any head layer of the model below and larger than its classifiers (32 x 4).
MIN_ELEMENTS = 512


def _mlp_with_real_heads() -> nn.Module:
    """3 exits; backbone Linear 32 x 32 (1024 values: large enough, but on the backbone path), heads
    ``Linear(32, 64) -> ReLU -> Linear(64, 4)`` as the zoo's tabular exits (2048 / 256 values)."""
    from mexit.train.heads import tabular_exit_head
    from mexit.train.multiexit import MultiExitNet

    torch.manual_seed(3)
    stages = [nn.Sequential(nn.Linear(12, 32), nn.ReLU())] + [nn.Sequential(nn.Linear(32, 32), nn.ReLU())
                                                             for _ in range(2)]
    heads = [tabular_exit_head(32, tiny.NUM_CLASSES, embedding=64) for _ in range(3)]
    tiny._scale_heads(heads, (3.0, 6.0, 3.0))
    return MultiExitNet(stages, heads, arch="tiny-mlp-heads", input_shape=(12,), num_classes=tiny.NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def head_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mexit.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "heads"
    return export_bundle(_mlp_with_real_heads(), out, sample_inputs=tiny.mlp_inputs(16, seed=4), threshold=0.6,
                         dataset_name="toy-rows", dataset_kind="tabular", exporter="legacy", save_torch_programs=False)


@pytest.fixture(autouse=True)
def _small_layers_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantize, "MIN_WEIGHT_ELEMENTS", MIN_ELEMENTS)


def _stages(bundle: Path) -> list[tuple[onnx.ModelProto, object]]:
    b = load_bundle(bundle)
    return [(onnx.load(str(b.file(e.stage_file))), e) for e in b.manifest.exits]


def _weight_sizes(model: onnx.ModelProto, nodes: list) -> list[int]:
    inits = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    return [inits[n.input[1]] for n in nodes]


def test_only_the_internal_heads_large_layers_are_picked(head_bundle: Path) -> None:
    for model, e in _stages(head_bundle):
        picked = quantize.head_matmuls(model, e.feature_output)
        if e.feature_output is None:
            assert picked == []  # the final stage is the vanilla model's too: left alone
            continue
        # the head's 32 -> 64 layer; not the backbone's 32 x 32 (on the feature path), not the 64 -> 4 classifier
        assert _weight_sizes(model, picked) == [2048]


def test_quantised_stage_keeps_the_features_and_moves_the_logits_a_little(head_bundle: Path) -> None:
    x = tiny.mlp_inputs(64, seed=8)
    h = x
    for model, e in _stages(head_bundle):
        float_sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        q, n = quantize.quantize_internal_head(onnx.load_from_string(model.SerializeToString()), e.feature_output)
        assert n == (0 if e.feature_output is None else 1)
        assert sum(node.op_type == "MatMulNBits" for node in q.graph.node) == n
        q_sess = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = [o for o in (e.feature_output, e.logits_output) if o]
        want = float_sess.run(outs, {e.input_name: h})
        got = q_sess.run(outs, {e.input_name: h})
        if e.feature_output:
            np.testing.assert_array_equal(got[0], want[0])  # the backbone is untouched
        spread = np.abs(want[-1]).max()
        assert 0 < np.abs(got[-1] - want[-1]).max() < 0.02 * spread or n == 0
        h = want[0]


def test_runtime_with_int8_heads_decides_each_sample_alone_and_mostly_as_float(head_bundle: Path) -> None:
    """Batch 1 (single graph) and batches (per-stage chain) give the same exit and probabilities per sample:
    MatMulNBits quantises activations per row, so a sample's exit does not depend on its batch-mates."""
    x = tiny.mlp_inputs(200, seed=11)
    reference = EarlyExitRuntime(head_bundle)
    tau = tiny.mid_threshold(reference.predict(x, force_exit=0).probs.max(axis=1), 0.5)
    reference = EarlyExitRuntime(head_bundle, threshold=tau)
    rt = EarlyExitRuntime(head_bundle, threshold=tau, int8_heads=True)
    assert rt.backend.options["int8_heads"] and not reference.backend.options["int8_heads"]
    assert rt._one is not None
    batch = rt.predict(x)
    assert len(np.unique(batch.exit_index)) == 3
    tiny.assert_batch1_matches(rt, x, batch)
    float_exits = reference.predict(x).exit_index
    assert np.mean(batch.exit_index == float_exits) >= 0.95
    assert np.abs(batch.probs - reference.predict(x).probs).max() > 0  # the heads really run in int8
    for k in range(3):
        assert rt.predict(x[:1], force_exit=k).exit_index[0] == k


def test_gemm_becomes_matmul_plus_bias_with_the_same_values() -> None:
    """``Gemm`` without a transposed weight and with ``beta`` != 1 is rewritten exactly (before quantising)."""
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], beta=0.5, name="g")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 6])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.normal(size=(5, 8)).astype(np.float32)
    name = quantize._gemm_as_matmul(model, model.graph.node[0])
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"] and model.graph.node[0].name == name
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w + 0.5 * b, rtol=1e-5, atol=1e-6)


def test_int8_heads_is_a_backend_option_from_the_command_line() -> None:
    assert parse_backend_options("onnxruntime", ["int8_heads=true"]) == {"int8_heads": True}


NO_TORCH_CHILD = """
    import numpy as np
    import mexit.runtime.quantize as quantize
    from mexit.runtime import EarlyExitRuntime

    quantize.MIN_WEIGHT_ELEMENTS = int(sys.argv[2])
    rt = EarlyExitRuntime(sys.argv[1], int8_heads=True)
    x = np.random.default_rng(0).normal(size=(4, 12)).astype(np.float32)
    print(json.dumps({"exits": rt.predict(x).exit_index.tolist(), "one": int(rt.predict(x[:1]).exit_index[0]),
                      "options": rt.backend.options}))
"""


def test_int8_heads_need_no_torch(head_bundle: Path) -> None:
    import json

    from tests._no_torch import run_without_torch

    proc = run_without_torch(NO_TORCH_CHILD, str(head_bundle), str(MIN_ELEMENTS))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["options"]["int8_heads"] is True and len(out["exits"]) == 4 and out["one"] == out["exits"][0]


def test_an_unnamed_head_matmul_is_quantised_and_the_backbone_one_is_not() -> None:
    rng = np.random.default_rng(1)
    w_bb, w_head = rng.normal(size=(32, 32)).astype(np.float32), rng.normal(size=(32, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_bb"], ["feat"]), helper.make_node("MatMul", ["feat", "w_head"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 32])],
                              [helper.make_tensor_value_info("feat", TensorProto.FLOAT, [None, 32]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 64])],
                              initializer=[numpy_helper.from_array(w_bb, "w_bb"),
                                           numpy_helper.from_array(w_head, "w_head")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q, n = quantize.quantize_internal_head(model, "feat")
    assert n == 1 and [node.op_type for node in q.graph.node] == ["MatMul", "MatMulNBits"]
    x = rng.normal(size=(3, 32)).astype(np.float32)
    feat, z = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(feat, x @ w_bb, rtol=1e-5, atol=1e-5)
    assert np.abs(z - feat @ w_head).max() < 0.02 * np.abs(feat @ w_head).max()

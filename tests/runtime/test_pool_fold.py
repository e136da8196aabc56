"""Folded mixed pools (mexit.runtime.pool_fold): same values, fewer nodes, only where the pattern is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from mexit.bundle import load_bundle
from mexit.runtime import EarlyExitRuntime
from mexit.runtime.pool_fold import fold_mixed_pools
from mexit.runtime.registry import parse_backend_options
from tests.export import tiny

#: Gates of the three heads: α = sigmoid(gate) above 1/2, below 1/2, and so close to 0 that the fold is skipped.
GATES = (1.2, -0.7, -9.0)


def _conv_with_sdn_heads() -> nn.Module:
    """4 exits on 1x16x16 images; the first three heads the zoo's SDN heads (gated mixed pool, 16x16 -> 4x4)."""
    from mexit.train.heads import image_exit_head, pooled_final_head
    from mexit.train.multiexit import MultiExitNet

    torch.manual_seed(7)
    stages = [nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())] + [
        nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()) for _ in range(3)]
    heads = [image_exit_head((16, 16, 16), tiny.NUM_CLASSES, embedding=32) for _ in range(3)]
    with torch.no_grad():
        for head, gate in zip(heads, GATES, strict=True):
            head.features.pool.gate.fill_(gate)
    heads.append(pooled_final_head(16, 32, tiny.NUM_CLASSES))
    tiny._scale_heads(heads, (12.0, 12.0, 12.0, 1.0))  # confident enough that exits spread
    return MultiExitNet(stages, heads, arch="tiny-sdn", input_shape=(1, 16, 16), num_classes=tiny.NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def sdn_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mexit.export import export_bundle

    x = np.random.default_rng(3).random((16, 1, 16, 16), dtype=np.float32)
    return export_bundle(_conv_with_sdn_heads(), tmp_path_factory.mktemp("bundles") / "sdn", sample_inputs=x,
                         threshold=0.4, dataset_name="toy-images", dataset_kind="image", exporter="legacy",
                         save_torch_programs=False)


def _run(model: onnx.ModelProto, name: str, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {name: x})


def test_each_gated_mixed_pool_folds_to_fewer_nodes_with_the_same_outputs(sdn_bundle: Path) -> None:
    b = load_bundle(sdn_bundle)
    h = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    for e, expected in zip(b.manifest.exits, (1, 1, 0, 0), strict=True):
        original = onnx.load(str(b.file(e.stage_file)))
        folded = onnx.load(str(b.file(e.stage_file)))
        assert fold_mixed_pools(folded, "elsewhere", 16) == 0  # the pools of another value: not these
        n = fold_mixed_pools(folded, e.feature_output or "", 16)
        assert n == expected, e.index
        onnx.checker.check_model(folded)
        if n:
            ops = [node.op_type for node in folded.graph.node]
            assert "Sigmoid" not in ops and "Mul" not in ops and ops.count("Conv") == 2
            assert len(folded.graph.node) < len(original.graph.node) - 2
        want = _run(original, e.input_name, h)
        for got, expected_out in zip(_run(folded, e.input_name, h), want, strict=True):
            np.testing.assert_allclose(got, expected_out, rtol=1e-5, atol=1e-5)
        h = want[0]  # the next stage's input


def test_runtime_with_folded_pools_answers_as_without(sdn_bundle: Path) -> None:
    x = np.random.default_rng(1).random((40, 1, 16, 16), dtype=np.float32)
    first = EarlyExitRuntime(sdn_bundle).predict(x, force_exit=0).probs.max(axis=1)
    tau = float(np.median(first))  # half the samples leave at the first exit
    plain = EarlyExitRuntime(sdn_bundle, threshold=tau, fold_pools=False)
    folded = EarlyExitRuntime(sdn_bundle, threshold=tau)  # the default
    assert folded.backend.options["fold_pools"] and not plain.backend.options["fold_pools"]
    for batch in (x, *(x[i : i + 1] for i in range(len(x)))):  # the chain, and the single graph per request
        a, b = plain.predict(batch), folded.predict(batch)
        np.testing.assert_array_equal(a.exit_index, b.exit_index)
        np.testing.assert_allclose(a.probs, b.probs, rtol=1e-5, atol=1e-6)
    assert len(set(plain.predict(x).exit_index.tolist())) > 1  # the threshold spreads the exits


def test_a_graph_without_mixed_pools_is_left_alone(conv_bundle: Path) -> None:
    b = load_bundle(conv_bundle)
    for e in b.manifest.exits:
        model = onnx.load(str(b.file(e.stage_file)))
        before = model.SerializeToString()
        assert fold_mixed_pools(model, e.feature_output or "", 8) == 0
        assert model.SerializeToString() == before


def test_fold_pools_can_be_turned_off_from_the_command_line() -> None:
    assert parse_backend_options("onnxruntime", ["fold_pools=false"]) == {"fold_pools": False}

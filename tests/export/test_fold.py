"""Folding Linear → BatchNorm1d before export: exact in eval mode, the caller's model untouched, no
BatchNormalization left in the exported stages."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

from mexit.bundle import load_bundle
from mexit.export import export_bundle
from mexit.export.fold import fold_linear_batchnorm
from mexit.train.multiexit import MultiExitNet
from tests.export import tiny


def _bn(width: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(width)
    with torch.no_grad():  # statistics far from the defaults, so an unfolded or wrongly folded norm shows
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _fcn(seed: int = 0) -> MultiExitNet:
    """FCN-18-style stages (Linear → BatchNorm1d → ReLU), one without a norm, a norm after a ReLU."""
    torch.manual_seed(seed)
    stages = [
        nn.Sequential(nn.Linear(12, 16), _bn(16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU(), _bn(16)),  # a norm not right after a Linear stays
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
    ]
    heads = [nn.Sequential(nn.Linear(16, 8), _bn(8), nn.ReLU(), nn.Linear(8, tiny.NUM_CLASSES)) for _ in range(3)]
    return MultiExitNet(stages, heads, arch="tiny-fcn", input_shape=(12,), num_classes=tiny.NUM_CLASSES).eval()


def test_fold_is_exact_and_leaves_the_callers_model_alone() -> None:
    model = _fcn()
    x = torch.from_numpy(tiny.mlp_inputs(32, seed=3))
    folded, n = fold_linear_batchnorm(model)
    assert n == 4  # stage 0 and the three heads; stage 1's norm follows a ReLU
    assert sum(isinstance(m, nn.BatchNorm1d) for m in folded.modules()) == 1
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 5  # the original keeps its norms
    with torch.no_grad():
        for want, got in zip(model(x), folded(x), strict=True):
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    plain = tiny.tiny_mlp()
    assert fold_linear_batchnorm(plain) == (plain, 0)  # nothing to fold: no copy


def test_exported_stages_hold_no_batchnorm_after_a_gemm(tmp_path) -> None:
    model = _fcn(seed=1)
    x = tiny.mlp_inputs(16, seed=4)
    out = export_bundle(model, tmp_path / "fcn", sample_inputs=x, threshold=0.5, dataset_name="rows",
                        dataset_kind="tabular", exporter="legacy", save_torch_programs=False)
    bundle = load_bundle(out)
    norms = [sum(node.op_type == "BatchNormalization" for node in onnx.load(str(bundle.stage_path(k))).graph.node)
             for k in range(3)]
    assert norms == [0, 1, 0]  # only the norm after a ReLU is left (it cannot fold into a Linear)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 5
    assert bundle.manifest.provenance["batchnorm_folded"] is True
    kept = load_bundle(export_bundle(model, tmp_path / "kept", sample_inputs=x, threshold=0.5, dataset_name="rows",
                                     dataset_kind="tabular", exporter="legacy", save_torch_programs=False,
                                     fold_batchnorm=False))
    assert sum(node.op_type == "BatchNormalization" for k in range(3)
               for node in onnx.load(str(kept.stage_path(k))).graph.node) == 5  # the graph as trained

"""Fold each ``Linear → BatchNorm1d`` pair into one ``Linear`` before export.

The dynamo exporter's optimiser already folds these pairs; the legacy exporter and the ``torch.export``
programs (the PyTorch backend) keep a ``BatchNormalization`` after each ``Gemm``, which ONNX Runtime runs as
its own node: one extra pass over every hidden activation per FCN-18 block (legacy FCN-18-1 ×6, all stages
folded 0.6–2.8 % faster at batch 1, 0.5–2 % at batch 64; ``benchmarks/export_batchnorm_fold.py``). In eval mode a
batch norm is an affine map per feature, so it folds exactly into the preceding layer's weight and bias
(:func:`torch.nn.utils.fusion.fuse_linear_bn_eval`); the stage's outputs agree with the unfolded module to
float32 rounding (the parity check says so).
"""

from __future__ import annotations

import copy
import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_linear_bn_eval


def _pairs(module: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """(container, linear's name, batch norm's name) for every Linear directly followed by a BatchNorm1d
    over its outputs, inside an ``nn.Sequential`` (where "followed" is the forward order)."""
    out = []
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in itertools.pairwise(names):
            lin, bn = seq._modules[a], seq._modules[b]
            if (isinstance(lin, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and bn.track_running_stats
                    and bn.running_mean is not None and bn.num_features == lin.out_features):
                out.append((seq, a, b))
    return out


def fold_linear_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``module`` with every ``Linear → BatchNorm1d`` pair folded into the ``Linear``
    (the batch norm becomes ``nn.Identity``), and how many pairs were folded. ``module`` itself is left as it
    is; without a pair it is returned unchanged (no copy)."""
    if not _pairs(module):
        return module, 0
    folded = copy.deepcopy(module).eval()
    pairs = _pairs(folded)
    for seq, a, b in pairs:
        seq._modules[a] = fuse_linear_bn_eval(seq._modules[a], seq._modules[b])  # type: ignore[arg-type]
        seq._modules[b] = nn.Identity()
    return folded, len(pairs)

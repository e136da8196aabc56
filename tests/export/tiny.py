"""Tiny multi-exit networks for export/runtime tests (built directly with the MultiExitNet constructor).

Weights are seeded and the heads scaled up so that softmax confidences spread over (0, 1): a threshold
between quantiles then really splits a batch across exits. BatchNorm gets non-trivial running
statistics so that an export in training mode would be caught by the parity checks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mexit.train.multiexit import MultiExitNet

NUM_CLASSES = 4


def _scale_heads(heads: list[nn.Module], factors: tuple[float, ...]) -> None:
    with torch.no_grad():
        for head, factor in zip(heads, factors, strict=True):
            for mod in head.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.mul_(factor)


def tiny_mlp(seed: int = 0) -> MultiExitNet:
    """Tabular-style 3-exit MLP on 12 features."""
    torch.manual_seed(seed)
    stages = [
        nn.Sequential(nn.Linear(12, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
    ]
    heads = [nn.Linear(16, NUM_CLASSES) for _ in range(3)]
    _scale_heads(heads, (6.0, 20.0, 6.0))
    return MultiExitNet(stages, heads, arch="tiny-mlp", input_shape=(12,), num_classes=NUM_CLASSES).eval()


def tiny_conv(seed: int = 0) -> MultiExitNet:
    """Image-style 3-exit conv net on 1x8x8 inputs, with BatchNorm."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    stages = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
    ]

    def head(c: int) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, NUM_CLASSES))

    heads = [head(4), head(8), head(8)]
    _scale_heads(heads, (8.0, 40.0, 25.0))
    return MultiExitNet(stages, heads, arch="tiny-conv", input_shape=(1, 8, 8), num_classes=NUM_CLASSES).eval()


def conv_inputs(n: int, seed: int = 1) -> np.ndarray:
    """Images in [0, 1] with a per-image brightness, so that confidences differ between images."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 8, 8), dtype=np.float32) * rng.random((n, 1, 1, 1), dtype=np.float32)
    return np.clip(2 * x, 0, 1).astype(np.float32)


def mlp_inputs(n: int, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 12)).astype(np.float32)


def torch_logits(model: MultiExitNet, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.numpy() for t in model(torch.from_numpy(x))]


def mid_threshold(scores: np.ndarray, q: float = 0.5) -> float:
    """A threshold strictly between two observed scores near quantile ``q`` (no sample sits on it)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    i = min(max(int(q * len(s)), 1), len(s) - 1)
    assert s[i - 1] < s[i], "tied scores: pick other inputs"
    return float((s[i - 1] + s[i]) / 2)


def assert_batch1_matches(rt, x: np.ndarray, want) -> None:
    """Every sample of ``x`` alone through ``rt`` takes ``want``'s exit with ``want``'s probabilities (to 1e-6)."""
    for i in range(len(x)):
        got = rt.predict(x[i : i + 1])
        assert got.exit_index[0] == want.exit_index[i], i
        np.testing.assert_allclose(got.probs[0], want.probs[i], atol=1e-6)
        assert got.latency_ns[0] > 0

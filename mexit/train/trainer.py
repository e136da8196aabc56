"""Joint training of all exits and per-exit evaluation.

The loss is the cross-entropy of every exit, summed (``weighting="sum"``), or weighted by the SDN ramp
of Kaya et al. (``weighting="sdn"``: internal exit ``i`` gets ``min(c_i, 0.01 + epoch * c_i / epochs)``
with ``c = 0.15, 0.30, …``, the final exit 1). The loop works on in-memory numpy arrays and slices
mini-batches from a seeded permutation: no DataLoader workers, no per-batch host syncs, so it runs as
fast as a plain PyTorch loop (``benchmarks/train_throughput.py`` checks that).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from mexit.train.multiexit import MultiExitNet

SDN_MAX_WEIGHTS: tuple[float, ...] = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


def exit_weights(num_exits: int, weighting: str, epoch: int, epochs: int) -> list[float]:
    """Loss weight of each exit at 1-based ``epoch`` of ``epochs``."""
    if weighting == "sum" or num_exits == 1:
        return [1.0] * num_exits
    if weighting == "sdn":
        internal = [min(c, 0.01 + epoch * c / epochs) for c in SDN_MAX_WEIGHTS[: num_exits - 1]]
        return [*internal, 1.0]
    raise ValueError(f"unknown weighting {weighting!r}; use 'sum' or 'sdn'")


def to_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """Model inputs from stored arrays: uint8 images become float32 in [0, 1]; floats pass through."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def train_epoch(
    model: MultiExitNet,
    optimizer: torch.optim.Optimizer,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int,
    weights: Sequence[float],
    generator: np.random.Generator,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """One pass over ``(x, y)`` in a seeded random order; returns the mean weighted loss per sample."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    order = generator.permutation(len(x))
    y_all = torch.from_numpy(y.astype(np.int64))
    total = torch.zeros((), device=device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < 2 and len(order) > 1:  # BatchNorm cannot train on a single sample
            continue
        xb = to_tensor(x[idx], device)
        yb = y_all[idx].to(device)
        outputs = model(xb)
        loss = sum(w * criterion(out, yb) for w, out in zip(weights, outputs, strict=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
        if on_batch is not None:
            on_batch(len(idx))
    return float(total) / max(len(order), 1)


def recalibrate_batchnorm(
    model: MultiExitNet, x: np.ndarray, *, batch_size: int = 256, device: torch.device | None = None
) -> None:
    """Recompute BatchNorm running statistics as exact averages over ``x`` (train-mode forward, no grad).

    With short CPU runs (or the reference's tiny N(0, 0.01) weight init) the exponential running
    averages lag far behind the batch statistics, and evaluation-mode accuracy collapses although the
    model fits its data. One pass of :func:`torch.optim.swa_utils.update_bn` after training fixes that.
    """
    device = device or next(model.parameters()).device
    batches = (to_tensor(x[i : i + batch_size], device) for i in range(0, len(x), batch_size))
    torch.optim.swa_utils.update_bn(batches, model, device=device)
    model.eval()


@torch.no_grad()
def exit_probabilities(
    model: MultiExitNet, x: np.ndarray, *, batch_size: int = 512, device: torch.device | None = None
) -> list[np.ndarray]:
    """Softmax outputs of every exit for every sample (evaluation mode), as float32 arrays."""
    device = device or next(model.parameters()).device
    model.eval()
    chunks: list[list[np.ndarray]] = [[] for _ in range(model.num_exits)]
    for start in range(0, len(x), batch_size):
        outputs = model(to_tensor(x[start : start + batch_size], device))
        for k, out in enumerate(outputs):
            chunks[k].append(torch.softmax(out, dim=1).cpu().numpy())
    if len(x) == 0:
        return [np.zeros((0, model.num_classes), dtype=np.float32) for _ in range(model.num_exits)]
    return [np.concatenate(c) for c in chunks]


def exit_accuracies(probs: Sequence[np.ndarray], y: np.ndarray) -> list[float]:
    """Top-1 accuracy of every exit."""
    return [float((p.argmax(axis=1) == y).mean()) if len(y) else 0.0 for p in probs]

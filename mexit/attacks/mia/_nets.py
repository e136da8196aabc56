"""Torch building blocks of the learned attack models (imported only when an attack is built).

Shapes follow the reference implementation's ``MLP_BLACKBOX`` and ``WhiteBoxAttackModel``
(reference-implementation.md §5.1–5.2).
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int, widths: tuple[int, ...], *, dropout: float = 0.0, final_relu: bool = False) -> nn.Sequential:
    """``Linear → ReLU (→ Dropout) → … → Linear`` (optionally ending in ReLU)."""
    layers: list[nn.Module] = []
    prev = d_in
    for i, width in enumerate(widths):
        layers.append(nn.Linear(prev, width))
        last = i == len(widths) - 1
        if not last or final_relu:
            layers.append(nn.ReLU())
        if not last and dropout:
            layers.append(nn.Dropout(dropout))
        prev = width
    return nn.Sequential(*layers)


class BranchNet(nn.Module):
    """One sub-network per input feature, outputs concatenated in a fixed order, then one encoder."""

    def __init__(self, branches: dict[str, nn.Module], encoder: nn.Module) -> None:
        super().__init__()
        self.order = list(branches)
        self.branches = nn.ModuleDict(branches)
        self.encoder = encoder

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(torch.cat([self.branches[name](batch[name]) for name in self.order], dim=1))


def gradient_branch(height: int, width: int, dropout: float = 0.5) -> nn.Sequential:
    """The reference's gradient-image branch on a (1, C, W) gradient: conv, pool to 5×5, MLP to 64.

    The 3×3 convolution is padded when the image is thinner than 3 (binary tasks, tiny embeddings).
    """
    pad = 1 if min(height, width) < 3 else 0
    return nn.Sequential(
        nn.Conv2d(1, 5, kernel_size=3, padding=pad),
        nn.AdaptiveAvgPool2d(5),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(125, 256), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(256, 128), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(128, 64),
    )


def score_model(num_exits: int | None) -> BranchNet:
    """``MLP_BLACKBOX``: top-3 branch (3→128→128), optional exit branch (E→128, ReLU), encoder →128→64→2."""
    branches: dict[str, nn.Module] = {"top3": mlp(3, (128, 128))}
    if num_exits is not None:
        branches["exit"] = mlp(num_exits, (128,), final_relu=True)
    encoder = mlp(128 * len(branches), (128, 64, 2))
    return BranchNet(branches, encoder)


def whitebox_model(num_classes: int, embedding_dim: int, gradient_shape: tuple[int, int], num_exits: int | None,
                   dropout: float = 0.5) -> BranchNet:
    """``WhiteBoxAttackModel``: label-correctness, posterior, gradient, embedding, loss (and exit) branches."""
    branches: dict[str, nn.Module] = {
        "correct": mlp(2, (128, 64), dropout=dropout),
        "posterior": mlp(num_classes, (128, 64), dropout=dropout),
        "gradient": gradient_branch(*gradient_shape, dropout=dropout),
        "embedding": mlp(embedding_dim, (128, 64), dropout=dropout),
        "loss": mlp(1, (128, 64), dropout=dropout),
    }
    if num_exits is not None:
        branches["exit"] = mlp(num_exits, (128, 64), dropout=dropout)
    encoder = nn.Sequential(
        nn.Dropout(dropout), nn.Linear(64 * len(branches), 256), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(256, 128), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(128, 64), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(64, 2),
    )
    return BranchNet(branches, encoder)

"""WideResNet-32-4, as in the reference (SDN's WideResNet).

A stem ``Conv3x3(C→16, bias)`` (stride 1 for 32×32, 2 for 64×64; no BN, the blocks are
pre-activation), then three stages of five pre-activation blocks of widths 64/128/256 (16 × 4). A block
is ``BN → ReLU → Conv3x3 → Dropout(0.3) → BN → ReLU → Conv3x3(stride s)`` plus a ``1x1 conv`` shortcut
when the shape changes; the stride sits on the *second* conv as in the reference, and the output is
the plain sum. Every block except the last may carry an exit. The final classifier is ``BN → ReLU →
global avg-pool → Linear(256, 512) → Dropout(0.5) → Linear(512, C)``. Init as the reference: conv
weights N(0, √(2 / (k²·out))), BN 1/0, linear biases 0 (weights at PyTorch defaults).
"""

from __future__ import annotations

import torch
from torch import nn

from mexit.train.backbones._common import image_backbone_spec, reference_init
from mexit.train.heads import pooled_final_head
from mexit.train.multiexit import BackboneSpec

WIDEN = 4
WIDTHS = (16 * WIDEN, 32 * WIDEN, 64 * WIDEN)
BLOCKS_PER_STAGE = 5
DROPOUT = 0.3
EMBEDDING = 512


def init_weights(module: nn.Module) -> None:
    """The reference's WRN initialisation (``module.apply`` target): default Linear weights, zero biases."""
    reference_init(module, linear_std=None, zero_conv_bias=False)


class WideBlock(nn.Module):
    """Pre-activation wide block with dropout between the convs; stride on the second conv."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.relu(self.bn1(x))))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)


def build(input_shape: tuple[int, ...], num_classes: int) -> BackboneSpec:
    """WRN-32-4 for ``(C, s, s)`` inputs, ``s`` in {32, 64}."""
    cin, size = input_shape[0], input_shape[1]
    blocks: list[nn.Module] = [nn.Conv2d(cin, 16, 3, stride=1 if size == 32 else 2, padding=1)]
    channels = 16
    for stage, width in enumerate(WIDTHS):
        for i in range(BLOCKS_PER_STAGE):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(WideBlock(channels, width, stride))
            channels = width
    final = pooled_final_head(channels, EMBEDDING, num_classes, pre=nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()))

    return image_backbone_spec("wrn32-4", blocks, final, num_classes=num_classes, embedding=EMBEDDING,
                               exit_candidates=list(range(1, len(blocks) - 1)), init=init_weights)

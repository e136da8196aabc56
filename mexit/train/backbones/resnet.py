"""ResNet-56 for 32×32 / 64×64 images, as in the reference (SDN's ResNet-56).

A stem ``Conv3x3(C→16) → BN → ReLU`` (stride 1 for 32×32, 2 for 64×64, so both reach the stages at
32×32), then three stages of nine basic blocks (16/32/64 channels; the first block of stages 2 and 3
has stride 2 and a ``1x1 conv + BN`` shortcut). Every basic block except the last may carry an exit;
the stem may not. The final classifier is ``global avg-pool → Linear(64, 512) → Dropout(0.5) →
Linear(512, C)``.

Difference from the reference: an exit reads the block's *output* (after the closing ReLU), not the
pre-ReLU sum. A stage boundary then carries a single tensor, which is what the next block consumes, so
an exported stage has one feature output. Init: conv kaiming-normal (fan_out, relu), BN 1/0, linear
layers at PyTorch defaults (as the reference).
"""

from __future__ import annotations

import torch
from torch import nn

from mexit.train.backbones._common import image_backbone_spec
from mexit.train.heads import pooled_final_head
from mexit.train.multiexit import BackboneSpec

WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 9
EMBEDDING = 512


def init_weights(module: nn.Module) -> None:
    """Kaiming init for convs, identity BN (``module.apply`` target)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def build(input_shape: tuple[int, ...], num_classes: int) -> BackboneSpec:
    """ResNet-56 for ``(C, s, s)`` inputs, ``s`` in {32, 64}."""
    cin, size = input_shape[0], input_shape[1]
    stem = nn.Sequential(
        nn.Conv2d(cin, WIDTHS[0], 3, stride=1 if size == 32 else 2, padding=1, bias=False),
        nn.BatchNorm2d(WIDTHS[0]),
        nn.ReLU(),
    )
    blocks: list[nn.Module] = [stem]
    channels = WIDTHS[0]
    for stage, width in enumerate(WIDTHS):
        for i in range(BLOCKS_PER_STAGE):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(channels, width, stride))
            channels = width
    final = pooled_final_head(channels, EMBEDDING, num_classes)

    for module in blocks:  # the reference leaves the heads' Linear layers at PyTorch's default init
        module.apply(init_weights)
    return image_backbone_spec("resnet56", blocks, final, num_classes=num_classes, embedding=EMBEDDING,
                               exit_candidates=list(range(1, len(blocks) - 1)))

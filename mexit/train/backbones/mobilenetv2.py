"""MobileNetV2 (Sandler et al., 2018) adapted to 32×32 / 64×64 inputs.

The paper names MobileNetV2; the reference code actually builds a MobileNet-V1-style network
(depthwise-separable blocks without inverted residuals). We implement the real V2: inverted residual
blocks (1x1 expansion ×t → depthwise 3x3 → linear 1x1 projection, residual when shape is kept), ReLU6,
the standard ``(t, c, n, s)`` table. CIFAR adaptation (as is common): the stem conv has stride 1 and
the second stage (c = 24) stride 1 for 32×32 inputs; for 64×64 inputs that second stage keeps the
standard stride 2. Both sizes end at 4×4×320 before the last block, a ``1x1 conv → 1280``, which never
carries an exit; each of the 17 inverted residual blocks may (the stem may not).

Final classifier (our choice, mirroring the reference MobileNet's end): ``global avg-pool →
Linear(1280, 1024) → Dropout(0.5) → Linear(1024, C)``; exit embeddings are 1024 wide as in the
reference. Init as torchvision's MobileNetV2: conv kaiming-normal (fan_out), BN 1/0, linear N(0, 0.01),
zero biases.
"""

from __future__ import annotations

import torch
from torch import nn

from mexit.train.backbones._common import image_backbone_spec
from mexit.train.heads import pooled_final_head
from mexit.train.multiexit import BackboneSpec

STEM = 32
LAST = 1280
EMBEDDING = 1024
# (expansion t, output channels c, repeats n, stride s of the first repeat); None = input-size dependent
SETTINGS: tuple[tuple[int, int, int, int | None], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, None),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def init_weights(module: nn.Module) -> None:
    """torchvision's MobileNetV2 initialisation (``module.apply`` target)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return layers


class InvertedResidual(nn.Module):
    """``[1x1 expand → BN → ReLU6] → dw3x3 → BN → ReLU6 → 1x1 project → BN`` (+ x when shapes match)."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn(cin, hidden, 1)
        layers += _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=False)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def build(input_shape: tuple[int, ...], num_classes: int) -> BackboneSpec:
    """MobileNetV2 for ``(C, s, s)`` inputs, ``s`` in {32, 64}."""
    cin, size = input_shape[0], input_shape[1]
    blocks: list[nn.Module] = [nn.Sequential(*_conv_bn(cin, STEM, 3, stride=1))]
    channels = STEM
    for t, c, n, s in SETTINGS:
        first_stride = s if s is not None else (1 if size == 32 else 2)
        for i in range(n):
            blocks.append(InvertedResidual(channels, c, first_stride if i == 0 else 1, t))
            channels = c
    blocks.append(nn.Sequential(*_conv_bn(channels, LAST, 1)))
    final = pooled_final_head(LAST, EMBEDDING, num_classes)

    return image_backbone_spec("mobilenetv2", blocks, final, num_classes=num_classes, embedding=EMBEDDING,
                               exit_candidates=list(range(1, len(blocks) - 1)), init=init_weights)

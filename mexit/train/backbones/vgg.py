"""VGG-16 with batch normalisation, as in the reference (SDN's VGG16-BN).

Thirteen ``Conv3x3 → BN → ReLU`` blocks (a 2×2 max-pool closes blocks 1, 3, 6, 9 and 12), then one
fully connected block ``Flatten → Linear(flat, fc0) → ReLU → Dropout(0.5)``, which is the last block
and so never carries an internal exit. The final classifier is ``Linear(fc0, fc1) → Dropout(0.5) →
Linear(fc1, C)``; ``fc = (512, 512)`` for 32×32 inputs and ``(2048, 1024)`` for 64×64 ones. Any conv
block may carry an exit. Initialisation follows the reference: conv weights N(0, √(2 / (k²·out))),
linear weights N(0, 0.01), zero biases, BN γ = 1, β = 0 — applied to the exit heads as well.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mexit.train.backbones._common import image_backbone_spec, reference_init
from mexit.train.heads import ExitHead
from mexit.train.multiexit import BackboneSpec

CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
POOL_AFTER = frozenset({1, 3, 6, 9, 12})
FC_LAYERS = {32: (512, 512), 64: (2048, 1024)}


def init_weights(module: nn.Module) -> None:
    """The reference's VGG initialisation (``module.apply`` target): Linear weights N(0, 0.01²)."""
    reference_init(module, linear_std=0.01, zero_conv_bias=True)


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(cin, cout, 3, padding=1), bn=nn.BatchNorm2d(cout), act=nn.ReLU()
    )
    if pool:
        layers["pool"] = nn.MaxPool2d(2)
    return nn.Sequential(layers)


def build(input_shape: tuple[int, ...], num_classes: int) -> BackboneSpec:
    """VGG-16-BN for ``(C, s, s)`` inputs, ``s`` in {32, 64}."""
    cin, size = input_shape[0], input_shape[1]
    blocks: list[nn.Module] = []
    for i, cout in enumerate(CHANNELS):
        blocks.append(_conv_block(cin, cout, i in POOL_AFTER))
        cin = cout
    fc0, fc1 = FC_LAYERS[size]
    spatial = size // 2 ** len(POOL_AFTER)
    flat = CHANNELS[-1] * spatial * spatial
    blocks.append(
        nn.Sequential(
            OrderedDict(flatten=nn.Flatten(1), fc=nn.Linear(flat, fc0), act=nn.ReLU(), dropout=nn.Dropout(0.5))
        )
    )
    final = ExitHead(nn.Linear(fc0, fc1), nn.Linear(fc1, num_classes))
    embedding = 512 if num_classes < 200 else 1024

    return image_backbone_spec("vgg16", blocks, final, num_classes=num_classes, embedding=embedding,
                               exit_candidates=list(range(len(CHANNELS))), init=init_weights)

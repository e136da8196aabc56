"""FCN-18-k: the fully connected networks for tabular data (Purchase, Texas, Location).

Widths 1024/2048/3072/4096 for k = 1..4 (the reference code has 3702 for FCN_3, apparently a typo of
3072; we use 3072). Five hidden blocks ``Linear → BatchNorm1d → ReLU`` (the first maps the input
features to the width) may each carry an exit. The reference's final classifier ``Linear(w, w) →
Dropout → Linear(w, 512) → Dropout → Linear(512, C)`` is split: its first layer becomes a sixth block
``Linear(w, w) → ReLU → Dropout(0.5)``, so that six exits (five internal ones after the five hidden
blocks, plus the final one) fit the rule that the last block carries no internal exit; the final head
is ``Linear(w, 512) → ReLU → Dropout(0.5) → Linear(512, C)``. We add the ReLUs the reference lacks
(without them its final classifier is one linear map in factored form).

The vanilla model keeps the reference's eight ``Linear`` layers; "18" counts the reference's layer
modules (5 × (Linear, BN, ReLU) + 3 final Linear). Exit heads: ``Linear(w, 512) → ReLU → Dropout(0.5) →
Linear(512, C)``. Init: linear N(0, 0.01), zero biases (BN at defaults), as the reference.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from mexit.train.heads import ExitHead, tabular_exit_head
from mexit.train.multiexit import BackboneSpec

WIDTHS = {"fcn18-1": 1024, "fcn18-2": 2048, "fcn18-3": 3072, "fcn18-4": 4096}
HIDDEN_BLOCKS = 5
EMBEDDING = 512


def init_weights(module: nn.Module) -> None:
    """Linear weights N(0, 0.01), zero biases (``module.apply`` target)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.01)
        nn.init.zeros_(module.bias)


def build(arch: str, input_shape: tuple[int, ...], num_classes: int) -> BackboneSpec:
    """FCN-18-k for ``(D,)`` inputs; ``arch`` picks the width."""
    width = WIDTHS[arch]
    blocks: list[nn.Module] = []
    features = input_shape[0]
    for _ in range(HIDDEN_BLOCKS):
        blocks.append(
            nn.Sequential(OrderedDict(fc=nn.Linear(features, width), bn=nn.BatchNorm1d(width), act=nn.ReLU()))
        )
        features = width
    blocks.append(nn.Sequential(OrderedDict(fc=nn.Linear(width, width), act=nn.ReLU(), dropout=nn.Dropout(0.5))))
    final = tabular_exit_head(width, num_classes, EMBEDDING)

    def make_head(shape: tuple[int, ...]) -> nn.Module:
        head: ExitHead = tabular_exit_head(shape[0], num_classes, EMBEDDING)
        head.apply(init_weights)
        return head

    for module in [*blocks, final]:
        module.apply(init_weights)
    return BackboneSpec(
        arch=arch,
        blocks=blocks,
        make_head=make_head,
        final_head=final,
        exit_candidates=list(range(HIDDEN_BLOCKS)),
    )

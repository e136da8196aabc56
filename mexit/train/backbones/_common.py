"""Pieces every image backbone shares: building its exit heads and initialising its weights alike."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from mexit.train.heads import image_exit_head
from mexit.train.multiexit import BackboneSpec


def image_backbone_spec(
    arch: str,
    blocks: list[nn.Module],
    final: nn.Module,
    *,
    num_classes: int,
    embedding: int,
    exit_candidates: list[int],
    init: Callable[[nn.Module], None] | None = None,
) -> BackboneSpec:
    """A :class:`BackboneSpec` whose exit heads are SDN-style image heads of width ``embedding``.

    With ``init``, the blocks, the final head and every exit head built later are initialised with it
    (the reference initialises heads like their backbone).
    """

    def make_head(shape: tuple[int, ...]) -> nn.Module:
        head = image_exit_head(shape, num_classes, embedding)
        if init is not None:
            head.apply(init)
        return head

    if init is not None:
        for module in [*blocks, final]:
            module.apply(init)
    return BackboneSpec(arch=arch, blocks=blocks, make_head=make_head, final_head=final,
                        exit_candidates=exit_candidates)


def reference_init(module: nn.Module, *, linear_std: float | None, zero_conv_bias: bool) -> None:
    """The reference code's VGG/WRN initialisation (one copy for both; ``module.apply`` via a lambda).

    Convs: N(0, 2 / (k·k·out)), biases zeroed if ``zero_conv_bias``; BatchNorm: weight 1, bias 0; Linear: bias 0
    and, when ``linear_std`` is given, weight N(0, linear_std²). VGG zeroes conv biases and draws Linear weights;
    the WRN keeps PyTorch's default conv biases and Linear weights, as the reference did.
    """
    if isinstance(module, nn.Conv2d):
        n = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / n))
        if zero_conv_bias and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        if linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
        nn.init.zeros_(module.bias)

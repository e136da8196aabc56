"""Pieces every image backbone shares: building its exit heads and initialising its weights alike."""

from __future__ import annotations

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

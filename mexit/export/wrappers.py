"""Thin modules that give each exported graph exactly the inputs and outputs the bundle format names.

Exporting the segments (not a forward with Python control flow) is what lets the runtime decide exits
per sample: a single graph can only branch on a scalar, i.e. per batch.
"""

from __future__ import annotations

import torch
from torch import nn

from mexit.train.multiexit import MultiExitNet


class StageExport(nn.Module):
    """Stage ``k`` plus its exit head: ``h_{k-1} -> (h_k, logits_k)``, or ``-> logits`` for the last stage."""

    def __init__(self, stage: nn.Module, head: nn.Module, *, last: bool) -> None:
        super().__init__()
        self.stage = stage
        self.head = head
        self.last = last

    def forward(self, h: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.stage(h)
        logits = self.head(h)
        return logits if self.last else (h, logits)


class FullExport(nn.Module):
    """All stages and the final head in one graph: the vanilla model the early-exit runtime is compared to."""

    def __init__(self, net: MultiExitNet) -> None:
        super().__init__()
        self.stages = net.stages
        self.head = net.heads[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

"""``MultiExitNet``: a backbone cut into stages, each followed by an exit head.

A backbone is described by a :class:`BackboneSpec` (an ordered list of blocks, a factory for exit
heads and the backbone's own final classifier). :meth:`MultiExitNet.from_backbone` measures the FLOPs
of every block with :class:`torch.utils.flop_counter.FlopCounterMode`, places the internal exits at the
block outputs whose cumulative FLOP fraction is closest to ``k / exits`` (``k = 1 .. exits-1``, the
"approximately equidistant workload" rule of Kaya et al. that the paper follows) and groups the blocks
into stages. Stage ``k`` maps the previous stage's features to features ``h_k``; head ``k`` maps
``h_k`` to logits. The last head is the backbone's own classifier, so one exit gives the vanilla model.

Input normalisation is the first operation of stage 0, so an exported stage 0 takes the same inputs
as the data layer produces (images in [0, 1], tabular rows as they are).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

MAX_EXITS = 6


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` for NCHW images (or per-feature for tabular rows)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], image: bool) -> None:
        super().__init__()
        shape = (1, -1, 1, 1) if image else (1, -1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class BackboneSpec:
    """What a backbone contributes to a multi-exit network.

    ``blocks`` run in order; ``exit_candidates`` lists the block indices whose outputs may carry an
    exit (the last block is never one: the final head sits there); ``make_head(feature_shape)`` builds
    an exit head for features of shape ``(C, H, W)`` or ``(D,)``; ``final_head`` is the backbone's own
    classifier on the last block's output.
    """

    arch: str
    blocks: list[nn.Module]
    make_head: Callable[[tuple[int, ...]], nn.Module]
    final_head: nn.Module
    exit_candidates: list[int] = field(default_factory=list)


def count_flops(module: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """FLOPs of one forward of ``module`` on ``x`` (as counted by ``FlopCounterMode``) and its output."""
    with FlopCounterMode(display=False) as counter:
        y = module(x)
    return int(counter.get_total_flops()), y


def place_exits(cumulative: Sequence[float], candidates: Sequence[int], exits: int) -> list[int]:
    """Pick ``exits - 1`` block indices whose cumulative FLOP fractions are closest to ``k / exits``.

    ``cumulative[i]`` is the fraction of the backbone's FLOPs spent up to and including block ``i``.
    Positions are strictly increasing; when two targets compete for one block, the later target takes
    the next candidate, so every requested exit gets a distinct block.
    """
    wanted = exits - 1
    if wanted > len(candidates):
        raise ValueError(f"{exits} exits need {wanted} exit positions but the backbone offers {len(candidates)}")
    chosen: list[int] = []
    for k in range(1, exits):
        target = k / exits
        remaining_after = wanted - k  # candidates that must stay free for later exits
        pool = [c for c in candidates if (not chosen or c > chosen[-1])]
        pool = pool[: len(pool) - remaining_after] if remaining_after else pool
        chosen.append(min(pool, key=lambda c: (abs(cumulative[c] - target), c)))
    return chosen


class MultiExitNet(nn.Module):
    """A network with ``len(stages)`` exits; ``forward`` returns the logits of every exit, in depth order."""

    def __init__(
        self,
        stages: Sequence[nn.Module],
        heads: Sequence[nn.Module],
        *,
        arch: str,
        input_shape: tuple[int, ...],
        num_classes: int,
        exit_blocks: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if len(stages) != len(heads) or not stages:
            raise ValueError("a MultiExitNet needs one head per stage and at least one stage")
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList(heads)
        self.arch = arch
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.exit_blocks = list(exit_blocks)

    @property
    def num_exits(self) -> int:
        return len(self.stages)

    @classmethod
    def from_backbone(
        cls,
        spec: BackboneSpec,
        *,
        exits: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> MultiExitNet:
        """Cut ``spec``'s blocks into ``exits`` stages at FLOP-equidistant block outputs."""
        if not 1 <= exits <= MAX_EXITS:
            raise ValueError(f"exits must be between 1 and {MAX_EXITS}, got {exits}")
        x = torch.zeros((1, *input_shape))
        flops: list[int] = []
        shapes: list[tuple[int, ...]] = []
        was_training = [b.training for b in spec.blocks]
        with torch.no_grad():
            for block in spec.blocks:
                block.eval()
                f, x = count_flops(block, x)
                flops.append(f)
                shapes.append(tuple(x.shape[1:]))
        for block, mode in zip(spec.blocks, was_training, strict=True):
            block.train(mode)
        total = max(sum(flops), 1)
        cumulative, acc = [], 0
        for f in flops:
            acc += f
            cumulative.append(acc / total)
        positions = place_exits(cumulative, spec.exit_candidates, exits)
        bounds = [*positions, len(spec.blocks) - 1]
        stages: list[nn.Module] = []
        heads: list[nn.Module] = []
        start = 0
        for i, end in enumerate(bounds):
            mods: list[nn.Module] = list(spec.blocks[start : end + 1])
            if i == 0 and normalization is not None:
                mods.insert(0, Normalize(normalization[0], normalization[1], image=len(input_shape) == 3))
            stages.append(nn.Sequential(*mods))
            heads.append(spec.final_head if i == len(bounds) - 1 else spec.make_head(shapes[end]))
            start = end + 1
        return cls(
            stages,
            heads,
            arch=spec.arch,
            input_shape=input_shape,
            num_classes=num_classes,
            exit_blocks=positions,
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        h = x
        for stage, head in zip(self.stages, self.heads, strict=True):
            h = stage(h)
            outputs.append(head(h))
        return outputs

    def stage_flops(self) -> tuple[list[int], list[int]]:
        """FLOPs of each stage and of each head at batch size 1."""
        x = torch.zeros((1, *self.input_shape))
        stage_f, head_f = [], []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for stage, head in zip(self.stages, self.heads, strict=True):
                f, x = count_flops(stage, x)
                stage_f.append(f)
                head_f.append(count_flops(head, x)[0])
        self.train(was_training)
        return stage_f, head_f

    def costs(self) -> list[int]:
        """Cumulative FLOPs of the path to each exit: stages ``0..k`` plus head ``k``.

        The last entry equals the vanilla (1-exit) model's FLOPs. This is the paper's per-exit cost.
        """
        stage_f, head_f = self.stage_flops()
        return [sum(stage_f[: k + 1]) + head_f[k] for k in range(self.num_exits)]

    def full_depth_flops(self) -> int:
        """FLOPs of the vanilla path: every stage and only the final head (``full_depth=True``).

        Equals ``costs()[-1]`` and the one-exit model's cost; kept as a named figure because speed-ups
        are reported relative to it.
        """
        stage_f, head_f = self.stage_flops()
        return sum(stage_f) + head_f[-1]

    def runtime_costs(self) -> list[int]:
        """FLOPs an early-exit runtime spends to leave at each exit: also every earlier head.

        Earlier heads count because the runtime must evaluate them to decide not to exit; this is the
        figure to predict realised speed-ups with.
        """
        stage_f, head_f = self.stage_flops()
        out, acc = [], 0
        for s, h in zip(stage_f, head_f, strict=True):
            acc += s + h
            out.append(acc)
        return out

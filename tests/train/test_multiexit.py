"""``MultiExitNet`` mechanics on a toy backbone: exit placement, stage cutting, FLOP accounting."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mexit.train.multiexit import BackboneSpec, MultiExitNet, Normalize, count_flops, place_exits

WIDTHS = [8, 16, 16, 32, 32, 32, 64]  # block i: Linear(WIDTHS[i-1] or IN, WIDTHS[i]) + ReLU
IN = 4
CLASSES = 3


def toy_spec() -> BackboneSpec:
    """Seven linear blocks of growing cost; every block but the last is a candidate."""
    blocks: list[nn.Module] = []
    prev = IN
    for w in WIDTHS:
        blocks.append(nn.Sequential(nn.Linear(prev, w), nn.ReLU()))
        prev = w
    return BackboneSpec(
        arch="toy",
        blocks=blocks,
        make_head=lambda shape: nn.Linear(shape[0], CLASSES),
        final_head=nn.Linear(prev, CLASSES),
        exit_candidates=list(range(len(WIDTHS) - 1)),
    )


def toy_model(exits: int, **kwargs: object) -> MultiExitNet:
    return MultiExitNet.from_backbone(toy_spec(), exits=exits, input_shape=(IN,), num_classes=CLASSES, **kwargs)


def test_place_exits_hits_equidistant_targets() -> None:
    cumulative = [(i + 1) / 12 for i in range(12)]  # equal-cost blocks
    assert place_exits(cumulative, list(range(11)), 4) == [2, 5, 8]  # 3/12, 6/12, 9/12
    assert place_exits(cumulative, list(range(11)), 1) == []
    assert place_exits(cumulative, list(range(11)), 6) == [1, 3, 5, 7, 9]  # 2/12 … 10/12


def test_place_exits_positions_are_distinct_increasing_and_near_targets() -> None:
    cumulative = [0.01, 0.02, 0.03, 0.5, 0.52, 0.9, 1.0]  # lumpy costs
    candidates = [0, 1, 2, 3, 4, 5]
    for exits in range(1, 7):
        chosen = place_exits(cumulative, candidates, exits)
        assert len(chosen) == exits - 1
        assert all(b > a for a, b in itertools.pairwise(chosen))
        assert set(chosen) <= set(candidates)
    # two targets (1/3, 2/3) compete for block 3; the later one takes the next free candidate
    assert place_exits(cumulative, candidates, 3) == [3, 4]
    assert place_exits(cumulative, candidates, 2) == [3]


def test_place_exits_only_uses_candidates() -> None:
    cumulative = [(i + 1) / 10 for i in range(10)]
    assert place_exits(cumulative, [2, 7, 8], 2) == [2]  # 0.3 is the candidate closest to 0.5
    assert place_exits(cumulative, [1, 6, 8], 2) == [6]
    assert place_exits(cumulative, [0, 9], 3) == [0, 9]  # forced: both candidates needed


def test_place_exits_needs_enough_candidates() -> None:
    with pytest.raises(ValueError, match="6 exits need 5 exit positions but the backbone offers 3"):
        place_exits([0.25, 0.5, 0.75, 1.0], [0, 1, 2], 6)


@pytest.mark.parametrize("exits", range(1, 7))
def test_from_backbone_cuts_stages_at_exit_blocks(exits: int) -> None:
    model = toy_model(exits)
    assert model.num_exits == exits and len(model.exit_blocks) == exits - 1
    assert sum(len(stage) for stage in model.stages) == len(WIDTHS)  # every block in exactly one stage
    bounds = [*model.exit_blocks, len(WIDTHS) - 1]
    for stage, head, end in zip(model.stages, model.heads, bounds, strict=True):
        assert stage[-1][0].out_features == WIDTHS[end] == head.in_features
    out = model(torch.randn(5, IN))
    assert len(out) == exits and all(o.shape == (5, CLASSES) for o in out)


def test_costs_are_cumulative_and_match_the_vanilla_model() -> None:
    model = toy_model(4)
    stage_f, head_f = model.stage_flops()
    costs = model.costs()
    assert costs == [sum(stage_f[: k + 1]) + head_f[k] for k in range(4)]
    assert model.runtime_costs()[-1] == sum(stage_f) + sum(head_f)
    vanilla = toy_model(1)
    assert costs[-1] == model.full_depth_flops() == vanilla.costs()[0] == vanilla.full_depth_flops()
    # FlopCounterMode counts 2·in·out per Linear at batch 1
    assert vanilla.costs()[0] == 2 * sum(a * b for a, b in zip([IN, *WIDTHS], [*WIDTHS, CLASSES], strict=True))


def test_flop_counting_keeps_the_training_mode() -> None:
    model = toy_model(3)
    model.train()
    model.costs()
    assert all(m.training for m in model.modules())
    model.eval()
    model.runtime_costs()
    assert not any(m.training for m in model.modules())


def test_count_flops_returns_output() -> None:
    layer = nn.Linear(4, 2)
    flops, y = count_flops(layer, torch.zeros(3, 4))
    assert flops == 2 * 3 * 4 * 2 and y.shape == (3, 2)


def test_from_backbone_rejects_bad_exit_counts() -> None:
    for exits in (0, 7):
        with pytest.raises(ValueError, match="between 1 and 6"):
            toy_model(exits)


def test_normalize_module() -> None:
    image = Normalize([0.5, 0.25], [2.0, 4.0], image=True)
    x = torch.ones(1, 2, 3, 3)
    assert torch.equal(image(x)[0, :, 0, 0], torch.tensor([0.25, 0.1875]))
    rows = Normalize([1.0, 2.0, 3.0], [1.0, 2.0, 0.5], image=False)
    assert torch.equal(rows(torch.tensor([[1.0, 4.0, 4.0]])), torch.tensor([[0.0, 1.0, 2.0]]))
    assert set(dict(rows.named_buffers())) == {"mean", "std"}  # saved with the checkpoint


def test_normalization_goes_first_in_stage_0() -> None:
    mean, std = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]
    torch.manual_seed(0)
    model = toy_model(3, normalization=(mean, std))
    torch.manual_seed(0)
    plain = toy_model(3)
    assert isinstance(model.stages[0][0], Normalize)
    assert all(not isinstance(m, Normalize) for s in model.stages[1:] for m in s.modules())
    x = torch.randn(4, IN)
    z = (x - torch.tensor(mean)) / torch.tensor(std)
    for a, b in zip(model(x), plain(z), strict=True):
        torch.testing.assert_close(a, b)
    assert model.costs() == plain.costs()  # normalisation is elementwise: no FLOPs counted

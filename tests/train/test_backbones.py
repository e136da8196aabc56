"""The model zoo: every backbone at every exit count builds, runs and has sensible exit costs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from mexit.errors import ConfigError, UserError
from mexit.train.backbones import fcn, mobilenetv2, resnet, vgg, wrn
from mexit.train.heads import ExitHead, MixedPool2d, image_exit_head, tabular_exit_head
from mexit.train.multiexit import MultiExitNet, Normalize
from mexit.train.zoo import ARCHITECTURES, arch_kind, build_backbone, build_model

IMAGE_ARCHS = [a for a in ARCHITECTURES if arch_kind(a) == "image"]
TABULAR_ARCHS = [a for a in ARCHITECTURES if arch_kind(a) == "tabular"]
CLASSES = 3
TABULAR_SHAPE = (20,)
IMAGE_SHAPE = (3, 32, 32)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded torch: the suite shares two cores, where oversubscribed threads only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shape_for(arch: str, size: int = 32) -> tuple[int, ...]:
    return (3, size, size) if arch_kind(arch) == "image" else TABULAR_SHAPE


_VANILLA: dict[tuple[str, tuple[int, ...]], int] = {}


def vanilla_flops(arch: str, shape: tuple[int, ...], model: MultiExitNet | None = None) -> int:
    """FLOPs of the one-exit model, built once per (arch, shape); ``model`` may be that model already."""
    key = (arch, shape)
    if key not in _VANILLA:
        vanilla = model if model is not None else build_model(arch, exits=1, input_shape=shape, num_classes=CLASSES)
        assert vanilla.num_exits == 1
        _VANILLA[key] = vanilla.costs()[0]
    return _VANILLA[key]


def run(model: MultiExitNet, batch: int = 2) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(torch.rand(batch, *model.input_shape))


def test_registry() -> None:
    assert ARCHITECTURES == ("vgg16", "resnet56", "mobilenetv2", "wrn32-4", "fcn18-1", "fcn18-2", "fcn18-3", "fcn18-4")
    assert IMAGE_ARCHS == ["vgg16", "resnet56", "mobilenetv2", "wrn32-4"]
    assert fcn.WIDTHS == {"fcn18-1": 1024, "fcn18-2": 2048, "fcn18-3": 3072, "fcn18-4": 4096}


@pytest.mark.parametrize("exits", range(1, 7))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_outputs_and_costs(arch: str, exits: int) -> None:
    shape = shape_for(arch)
    model = build_model(arch, exits=exits, input_shape=shape, num_classes=CLASSES)
    assert model.num_exits == exits == len(model.heads)
    assert len(model.exit_blocks) == exits - 1
    outputs = run(model)
    assert len(outputs) == exits
    assert all(o.shape == (2, CLASSES) and torch.isfinite(o).all() for o in outputs)

    costs = model.costs()
    assert all(b > a for a, b in itertools.pairwise(costs)), costs
    fractions = [c / costs[-1] for c in costs]
    assert fractions[0] > 0 and fractions[-1] == 1.0
    assert costs[-1] == vanilla_flops(arch, shape, model if exits == 1 else None)  # last exit = vanilla model
    if arch_kind(arch) == "image":
        # FLOP-equidistant placement: every exit within a few percent of k / exits of the full cost
        assert all(abs(f - (k + 1) / exits) < 0.08 for k, f in enumerate(fractions)), fractions
    if exits == 6:  # the other cost views (each is another FLOP-counting pass, so checked once per arch)
        assert model.full_depth_flops() == costs[-1]
        runtime = model.runtime_costs()
        assert runtime[0] == costs[0] and runtime[-1] > costs[-1]
        assert all(r >= c for r, c in zip(runtime, costs, strict=True))


@pytest.mark.parametrize("exits", [1, 6])
@pytest.mark.parametrize("arch", IMAGE_ARCHS)
def test_64x64_images(arch: str, exits: int) -> None:
    model = build_model(arch, exits=exits, input_shape=(3, 64, 64), num_classes=CLASSES)
    outputs = run(model)
    assert [tuple(o.shape) for o in outputs] == [(2, CLASSES)] * exits
    assert model.costs()[-1] == vanilla_flops(arch, (3, 64, 64), model if exits == 1 else None)


def test_structures_follow_the_reference() -> None:
    """Block counts, exit candidates and feature shapes of each backbone."""
    spec = vgg.build(IMAGE_SHAPE, CLASSES)
    assert len(spec.blocks) == 14 and spec.exit_candidates == list(range(13))
    assert sum(isinstance(m, nn.MaxPool2d) for b in spec.blocks for m in b.modules()) == 5
    assert spec.final_head.classifier.in_features == 512
    assert vgg.build((3, 64, 64), 200).blocks[-1].fc.out_features == 2048

    spec = resnet.build(IMAGE_SHAPE, CLASSES)
    assert len(spec.blocks) == 28 and spec.exit_candidates == list(range(1, 27))
    assert sum(isinstance(b, resnet.BasicBlock) for b in spec.blocks) == 27

    spec = wrn.build(IMAGE_SHAPE, CLASSES)
    assert len(spec.blocks) == 16 and spec.exit_candidates == list(range(1, 15))
    assert [b.conv2.stride for b in spec.blocks[1:]] == [(1, 1)] * 5 + ([(2, 2)] + [(1, 1)] * 4) * 2

    spec = mobilenetv2.build(IMAGE_SHAPE, CLASSES)
    residual_blocks = [b for b in spec.blocks if isinstance(b, mobilenetv2.InvertedResidual)]
    assert len(residual_blocks) == 17 and spec.exit_candidates == list(range(1, 18))
    x = torch.zeros(1, *IMAGE_SHAPE)
    with torch.no_grad():
        for b in spec.blocks:
            b.eval()
            x = b(x)
    assert tuple(x.shape) == (1, 1280, 4, 4)

    spec = fcn.build("fcn18-3", TABULAR_SHAPE, CLASSES)
    linears = [m for b in [*spec.blocks, spec.final_head] for m in b.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 8 and linears[0].in_features == 20 and linears[0].out_features == 3072
    assert spec.exit_candidates == [0, 1, 2, 3, 4] and len(spec.blocks) == 6


def test_image_head_pools_to_4x4_with_learnable_mix() -> None:
    head = image_exit_head((16, 32, 32), 7, 64)
    pool = head.features.pool
    assert isinstance(pool, MixedPool2d) and pool.alpha.item() == pytest.approx(0.5)
    x = torch.randn(2, 16, 32, 32)
    expected = 0.5 * nn.functional.max_pool2d(x, 8) + 0.5 * nn.functional.avg_pool2d(x, 8)
    torch.testing.assert_close(pool(x), expected)
    assert head.features.fc.in_features == 16 * 4 * 4
    assert head(x).shape == (2, 7) and head.embedding(x).shape == (2, 64)
    assert any(p is pool.gate for p in head.parameters())
    small = image_exit_head((8, 2, 2), 7, 64)  # below 4x4: no pooling
    assert isinstance(small.features.pool, nn.Identity) and small.features.fc.in_features == 32


def test_tabular_head_has_relu_between_linears() -> None:
    head = tabular_exit_head(32, 5)
    assert isinstance(head, ExitHead)
    assert [type(m) for m in head.features] == [nn.Linear, nn.ReLU]
    assert head.classifier.in_features == 512 and head.classifier.out_features == 5


def test_exit_embedding_widths() -> None:
    assert build_backbone("vgg16", IMAGE_SHAPE, 10).make_head((64, 16, 16)).classifier.in_features == 512
    assert build_backbone("vgg16", (3, 64, 64), 200).make_head((64, 32, 32)).classifier.in_features == 1024
    assert build_backbone("mobilenetv2", IMAGE_SHAPE, 10).make_head((24, 32, 32)).classifier.in_features == 1024
    assert build_backbone("resnet56", IMAGE_SHAPE, 10).make_head((16, 32, 32)).classifier.in_features == 512


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet18"}, "choose one of: vgg16, resnet56"),
        ({"exits": 0}, r"from 1 \(vanilla\) to 6"),
        ({"exits": 7}, r"from 1 \(vanilla\) to 6"),
        ({"exits": True}, r"from 1 \(vanilla\) to 6"),
        ({"input_shape": (600,)}, "fcn18-1..fcn18-4"),
        ({"arch": "fcn18-1", "input_shape": (3, 32, 32)}, "tabular rows"),
        ({"input_shape": (3, 28, 28)}, "32x32 or 64x64"),
        ({"input_shape": (3, 32, 64)}, "32x32 or 64x64"),
        ({"num_classes": 1}, "num_classes"),
        ({"normalization": ([0.5, 0.5], [0.2, 0.2])}, "normalization mean has 2 values"),
        ({"normalization": ([0.5], [0.0])}, "std must be positive"),
    ],
)
def test_config_errors(kwargs: dict, message: str) -> None:
    args = {"arch": "resnet56", "exits": 2, "input_shape": IMAGE_SHAPE, "num_classes": CLASSES, **kwargs}
    with pytest.raises(ConfigError, match=message) as info:
        build_model(args.pop("arch"), **args)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)


def test_arch_kind() -> None:
    assert arch_kind("wrn32-4") == "image" and arch_kind("fcn18-4") == "tabular"
    with pytest.raises(ConfigError, match="unknown architecture 'mlp'"):
        arch_kind("mlp")
    with pytest.raises(ConfigError, match="tabular rows"):
        build_backbone("fcn18-2", (1, 64, 64), CLASSES)


@pytest.mark.parametrize(("arch", "shape"), [("mobilenetv2", IMAGE_SHAPE), ("fcn18-1", TABULAR_SHAPE)])
def test_normalization_is_the_first_op_of_stage_0(arch: str, shape: tuple[int, ...]) -> None:
    mean = [0.1 * (i + 1) for i in range(shape[0])]
    std = [0.5 + 0.1 * i for i in range(shape[0])]
    torch.manual_seed(0)
    normalized = build_model(arch, exits=3, input_shape=shape, num_classes=CLASSES, normalization=(mean, std))
    torch.manual_seed(0)
    plain = build_model(arch, exits=3, input_shape=shape, num_classes=CLASSES)
    assert isinstance(normalized.stages[0][0], Normalize)
    assert not any(isinstance(m, Normalize) for m in plain.modules())
    normalized.eval()
    plain.eval()
    x = torch.rand(2, *shape)
    view = (1, -1, 1, 1) if len(shape) == 3 else (1, -1)
    z = (x - torch.tensor(mean).reshape(view)) / torch.tensor(std).reshape(view)
    with torch.no_grad():
        got, want, raw = normalized(x), plain(z), plain(x)
    for g, w, r in zip(got, want, raw, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=0)  # fresh logits are tiny: compare relatively
        assert not torch.allclose(g, r, rtol=1e-2, atol=0)


@pytest.mark.parametrize("arch", ["vgg16", "resnet56", "mobilenetv2", "fcn18-1"])
def test_state_dict_round_trip_from_config(arch: str) -> None:
    shape = shape_for(arch)
    config = {"exits": 6, "input_shape": shape, "num_classes": CLASSES, "normalization": ([0.5], [0.25])}
    torch.manual_seed(1)
    trained = build_model(arch, **config)
    torch.manual_seed(2)
    rebuilt = build_model(arch, **config)
    x = torch.rand(2, *shape)
    trained.eval()
    rebuilt.eval()
    with torch.no_grad():
        before = rebuilt(x)
        rebuilt.load_state_dict(trained.state_dict())
        after, want = rebuilt(x), trained(x)
    assert rebuilt.exit_blocks == trained.exit_blocks
    assert not torch.equal(before[0], want[0])
    for a, w in zip(after, want, strict=True):
        assert torch.equal(a, w)

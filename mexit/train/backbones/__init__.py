"""The backbone zoo: name → :class:`~mexit.train.multiexit.BackboneSpec`.

Each backbone lives in its own module (``vgg``, ``resnet``, ``wrn``, ``mobilenetv2``, ``fcn``) and
follows the reference implementation's structure (``shared/reference/reference-implementation.md`` §1),
with the deliberate differences stated in its docstring. A backbone is an ordered list of blocks; the
blocks listed as exit candidates are where :meth:`MultiExitNet.from_backbone` may place internal exits
(stems and the last block never are). This module validates the user-facing combination of
architecture, input shape and class count, so that a wrong configuration fails with one actionable line
instead of a shape error deep inside torch.
"""

from __future__ import annotations

from typing import Literal

from mexit.errors import ConfigError
from mexit.train.backbones import fcn, mobilenetv2, resnet, vgg, wrn
from mexit.train.multiexit import BackboneSpec

ARCHITECTURES: tuple[str, ...] = (
    "vgg16",
    "resnet56",
    "mobilenetv2",
    "wrn32-4",
    "fcn18-1",
    "fcn18-2",
    "fcn18-3",
    "fcn18-4",
)
IMAGE_SIZES: tuple[int, ...] = (32, 64)

_IMAGE_BUILDERS = {"vgg16": vgg.build, "resnet56": resnet.build, "mobilenetv2": mobilenetv2.build, "wrn32-4": wrn.build}


def arch_kind(arch: str) -> Literal["image", "tabular"]:
    """Whether ``arch`` takes ``(C, H, W)`` images or ``(D,)`` feature rows."""
    if arch in _IMAGE_BUILDERS:
        return "image"
    if arch in fcn.WIDTHS:
        return "tabular"
    raise ConfigError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")


def check_input(arch: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Raise :class:`ConfigError` unless ``arch`` can take ``input_shape`` and predict ``num_classes``."""
    kind = arch_kind(arch)
    shape = tuple(input_shape)
    if not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ConfigError(f"input shape {shape} must consist of positive integers (without the batch axis)")
    if kind == "image":
        sizes = " or ".join(f"(C, {s}, {s})" for s in IMAGE_SIZES)
        if len(shape) != 3:
            raise ConfigError(
                f"architecture {arch!r} takes images {sizes} but the input shape is {shape}; "
                f"use one of fcn18-1..fcn18-4 for tabular data"
            )
        if shape[1] != shape[2] or shape[1] not in IMAGE_SIZES:
            raise ConfigError(
                f"architecture {arch!r} supports square 32x32 or 64x64 images, got {shape[1]}x{shape[2]}; "
                f"resize the images to {sizes}"
            )
    elif len(shape) != 1:
        raise ConfigError(
            f"architecture {arch!r} takes tabular rows (D,) but the input shape is {shape}; "
            f"use one of {', '.join(_IMAGE_BUILDERS)} for images"
        )
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def build_backbone(arch: str, input_shape: tuple[int, ...], num_classes: int) -> BackboneSpec:
    """Build the freshly initialised backbone ``arch`` for ``input_shape`` (no batch axis) and ``num_classes``."""
    check_input(arch, input_shape, num_classes)
    shape = tuple(input_shape)
    if arch in _IMAGE_BUILDERS:
        return _IMAGE_BUILDERS[arch](shape, num_classes)
    return fcn.build(arch, shape, num_classes)


__all__ = ["ARCHITECTURES", "IMAGE_SIZES", "arch_kind", "build_backbone", "check_input"]

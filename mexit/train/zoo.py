"""Build a multi-exit model from its configuration alone.

``build_model(arch, exits=…, input_shape=…, num_classes=…, normalization=…)`` is deterministic in its
structure (exit placement depends only on the measured FLOPs), so a checkpoint's ``state_dict`` can be
loaded into a model rebuilt from the run's config: this is how later stages (export, white-box
attacks) get the trained model back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mexit.errors import ConfigError
from mexit.train.backbones import ARCHITECTURES, arch_kind, build_backbone, check_input
from mexit.train.multiexit import MAX_EXITS, MultiExitNet

__all__ = ["ARCHITECTURES", "arch_kind", "build_backbone", "build_model"]


def _check_normalization(
    normalization: tuple[Sequence[float], Sequence[float]], input_shape: tuple[int, ...]
) -> None:
    try:
        mean, std = (list(map(float, v)) for v in normalization)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"normalization must be a (mean, std) pair of number sequences: {exc}") from None
    axis = input_shape[0]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, axis):
            raise ConfigError(
                f"normalization {name} has {len(values)} values but the input has {axis} "
                f"{'channels' if len(input_shape) == 3 else 'features'}; give 1 or {axis}"
            )
        if not all(math.isfinite(v) for v in values):
            raise ConfigError(f"normalization {name} must be finite, got {values}")
    if any(s <= 0 for s in std):
        raise ConfigError(f"normalization std must be positive, got {std}")


def build_model(
    arch: str,
    *,
    exits: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
) -> MultiExitNet:
    """A freshly initialised ``arch`` with ``exits`` exits (1 = the vanilla model).

    ``input_shape`` has no batch axis: ``(C, 32, 32)``/``(C, 64, 64)`` for image architectures, ``(D,)``
    for ``fcn18-*``. ``normalization = (mean, std)`` (per channel or per feature) becomes the first
    operation of stage 0. Raises :class:`ConfigError` for an unknown name, an exit count outside
    1..6, an input shape the architecture cannot take, or malformed normalisation.
    """
    arch_kind(arch)  # unknown names first: that is the most likely mistake
    if isinstance(exits, bool) or not isinstance(exits, int) or not 1 <= exits <= MAX_EXITS:
        raise ConfigError(f"exits must be an integer from 1 (vanilla) to {MAX_EXITS}, got {exits!r}")
    shape = tuple(input_shape)
    check_input(arch, shape, num_classes)
    if normalization is not None:
        _check_normalization(normalization, shape)
    spec = build_backbone(arch, shape, num_classes)
    return MultiExitNet.from_backbone(
        spec, exits=exits, input_shape=shape, num_classes=num_classes, normalization=normalization
    )

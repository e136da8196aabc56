"""Gradient-based (white-box) attack of Nasr et al., and its hybrid form with the exit.

Five inputs per sample, each through its own branch (reference ``WhiteBoxAttackModel``): whether the
prediction is correct (one-hot, 2), the posterior sorted in descending order (C), the embedding feeding
the taken exit's last layer (E), the loss (1), and the gradient of the loss with respect to that layer's
weight as a 1×C×W image (C classes × W inputs, through a 3×3 convolution pooled to 5×5). The hybrid
form adds a branch on the one-hot of the observed exit.

Scaling (not in the reference, which feeds raw values): the embedding is standardised per feature,
the loss and the gradient image by one mean/std each, all estimated on the shadow fit part, so that
SGD is not dominated by whichever input happens to be largest. The gradient stays a numpy array and
is converted one mini-batch at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mexit.attacks.mia._learned import Features, LearnedAttack, Scaling, standardise
from mexit.attacks.mia.base import exit_one_hot, sorted_probs
from mexit.attacks.mia.registry import register
from mexit.attacks.signals import Signals, SignalsError


def gradient_image_shape(signals: Signals) -> tuple[int, int]:
    """``(C, W)`` of each sample's gradient matrix: from ``meta["gradient_shape"]`` or ``G = C * W``."""
    g = signals.gradient.shape[1] if signals.gradient.ndim == 2 else int(np.prod(signals.gradient.shape[1:]))
    shape = signals.meta.get("gradient_shape")
    if shape is not None:
        shape = tuple(int(d) for d in shape)[-2:]
        if len(shape) != 2 or shape[0] * shape[1] != g:
            raise SignalsError(f"meta gradient_shape {signals.meta['gradient_shape']} does not match gradients of "
                               f"{g} values per sample")
        return shape[0], shape[1]
    if g % signals.num_classes:
        raise SignalsError(f"gradients hold {g} values per sample, not a multiple of the {signals.num_classes} "
                           f"classes; record meta['gradient_shape'] = [classes, inputs] when collecting")
    return signals.num_classes, g // signals.num_classes


@register
class GradientAttack(LearnedAttack):
    """Nasr et al.'s white-box attack model on correctness, posterior, embedding, loss and gradient."""

    name = "gradient"
    requires = frozenset({"probs", "loss", "embedding", "gradient"})
    hybrid = False
    description = "white-box attack model on correctness, posterior, embedding, loss and last-layer gradient"

    def __init__(self, *, seed: int = 0, batch_size: int = 128, dropout: float = 0.5, **kwargs: Any) -> None:
        super().__init__(seed=seed, batch_size=batch_size, **kwargs)
        self.dropout = dropout

    def _features(self, signals: Signals) -> Features:
        rows, (c, w) = len(signals), gradient_image_shape(signals)
        correct = (signals.pred_label == signals.true_label).astype(np.int64)
        feats = {
            "correct": np.eye(2, dtype=np.float32)[correct],
            "posterior": sorted_probs(signals.probs),
            "gradient": signals.gradient.reshape(rows, 1, c, w),  # a view: never copied whole
            "embedding": signals.embedding.reshape(rows, -1),
            "loss": signals.loss.reshape(rows, 1),
        }
        if self.hybrid:
            feats["exit"] = exit_one_hot(signals)
        return feats

    def _scaling(self, feats: Features, fit_idx: np.ndarray) -> Scaling:
        return {
            "embedding": standardise(feats["embedding"], fit_idx),
            "loss": standardise(feats["loss"], fit_idx),
            "gradient": standardise(feats["gradient"], fit_idx, per_feature=False),
        }

    def _build(self, signals: Signals) -> Any:
        from mexit.attacks.mia._nets import whitebox_model

        return whitebox_model(signals.num_classes, int(np.prod(signals.embedding.shape[1:])),
                              gradient_image_shape(signals), signals.num_exits if self.hybrid else None, self.dropout)

    def _fit(self, shadow: Signals) -> None:
        self._dims = self._white_box_dims(shadow)
        super()._fit(shadow)

    def _check_target(self, target: Signals) -> None:
        dims = self._white_box_dims(target)
        if dims != self._dims:
            raise SignalsError(f"white-box features differ between shadow and target: embedding/gradient sizes "
                               f"{self._dims} vs {dims}; collect both from models of the same architecture")

    @staticmethod
    def _white_box_dims(signals: Signals) -> tuple[int, tuple[int, int]]:
        return int(np.prod(signals.embedding.shape[1:])), gradient_image_shape(signals)


@register
class GradientHybridAttack(GradientAttack):
    """The white-box attack model plus a branch on the one-hot of the observed exit (paper §4.1)."""

    name = "gradient-hybrid"
    requires = frozenset({"probs", "loss", "embedding", "gradient", "exit_index"})
    hybrid = True
    description = "white-box attack model plus the one-hot of the observed exit"

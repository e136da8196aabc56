"""Classifier heads: the exits placed inside a backbone and the backbones' own final classifiers.

Every head is an :class:`ExitHead`: ``features`` (pooling/flattening and the embedding layer), a
``dropout`` and a linear ``classifier``. The uniform shape matters downstream: the white-box attack
reads ``head.embedding(h)`` (the reference's ``layer_0`` output) and the gradient of
``head.classifier.weight`` (its ``layer_2``) at whichever exit a sample leaves, final exit included.

Internal exits follow the SDN internal classifier (Kaya et al., ICML'19) that the reference code
imports but does not ship: for image features of spatial size ``s >= 4`` a mixed pooling
``α·maxpool + (1-α)·avgpool`` with kernel ``s // 4`` reduces the map to 4×4; smaller maps are used as
they are. Two deliberate differences from the reference:

* ``α = sigmoid(g)`` with a learnable ``g`` initialised to 0 (α = 0.5), instead of SDN's unbounded
  scalar initialised from U(0, 1): the gate keeps the mix convex, so training cannot turn it into a
  scaled or negated pooling, and the initial value is deterministic.
* a ReLU sits between the embedding ``Linear`` and the classifier ``Linear``. The reference heads have
  none, which makes each head one linear map in factored form; with the ReLU the head is a real MLP.

Kernel sizes are fixed at construction and flattening uses ``flatten(1)``, so every head exports to
ONNX with a dynamic batch axis.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

DROPOUT = 0.5


class MixedPool2d(nn.Module):
    """``α·max_pool(x) + (1-α)·avg_pool(x)`` with a learnable gate ``α = sigmoid(gate)``."""

    def __init__(self, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.max_pool = nn.MaxPool2d(kernel)
        self.avg_pool = nn.AvgPool2d(kernel)
        self.gate = nn.Parameter(torch.zeros(1))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.gate)
        return a * self.max_pool(x) + (1 - a) * self.avg_pool(x)


class ExitHead(nn.Module):
    """``classifier(dropout(features(h)))``; ``features(h)`` is the head's embedding."""

    def __init__(self, features: nn.Module, classifier: nn.Linear, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.classifier = classifier

    def embedding(self, h: torch.Tensor) -> torch.Tensor:
        """The penultimate representation (input of ``classifier``), as the white-box attack uses it."""
        return self.features(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(h)))


def _pool_kernel(size: int) -> int:
    """SDN's feature reduction: kernel ``s // 4`` for ``s >= 4`` (4×4 output), none below."""
    return size // 4 if size >= 4 else 1


def image_exit_head(feature_shape: tuple[int, ...], num_classes: int, embedding: int) -> ExitHead:
    """SDN-style internal classifier for ``(C, H, W)`` features: mixed pool → MLP(embedding) → logits."""
    if len(feature_shape) != 3:
        raise ValueError(f"an image exit head needs (C, H, W) features, got {feature_shape}")
    channels, height, width = feature_shape
    kh, kw = _pool_kernel(height), _pool_kernel(width)
    pool: nn.Module = MixedPool2d((kh, kw)) if (kh, kw) != (1, 1) else nn.Identity()
    pooled = channels * (height // kh) * (width // kw)
    features = nn.Sequential(
        OrderedDict(
            pool=pool,
            flatten=nn.Flatten(1),
            fc=nn.Linear(pooled, embedding),
            act=nn.ReLU(),
        )
    )
    return ExitHead(features, nn.Linear(embedding, num_classes))


def tabular_exit_head(width: int, num_classes: int, embedding: int = 512) -> ExitHead:
    """Exit for ``(D,)`` features: ``Linear(D, 512) → ReLU → Dropout(0.5) → Linear(512, C)``."""
    features = nn.Sequential(OrderedDict(fc=nn.Linear(width, embedding), act=nn.ReLU()))
    return ExitHead(features, nn.Linear(embedding, num_classes))


def pooled_final_head(
    channels: int, embedding: int, num_classes: int, *, pre: nn.Module | None = None
) -> ExitHead:
    """A CNN's own classifier: ``[pre →] global avg-pool → Linear(C, emb) → Dropout(0.5) → Linear(emb, classes)``.

    No nonlinearity between the two ``Linear`` layers, as in the reference's final classifiers, so that
    the vanilla (one-exit) model is the reference's model.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if pre is not None:
        layers["pre"] = pre
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten(1)
    layers["fc"] = nn.Linear(channels, embedding)
    return ExitHead(nn.Sequential(layers), nn.Linear(embedding, num_classes))

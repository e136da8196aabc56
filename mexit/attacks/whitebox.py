"""White-box signals of a multi-exit model: the taken exit's embedding and last-layer gradient (torch).

The gradient-based attack (Nasr et al.; paper §3.2) feeds, per sample, the taken exit's prediction,
its penultimate representation (``head.embedding(h)``), the loss and the gradient of the loss with
respect to the exit's last Linear weight (``head.classifier.weight``).

* **Exit** — decided per sample as the runtime does (:class:`mexit.runtime.policy.ExitPolicy`, first
  exit whose rule fires, else the final exit), never for a whole batch from its first sample. The
  forward pass is chained and compacted like the runtime's: samples that left stop computing. Torch
  and the exported ONNX stages agree to ~1e-6, so a sample whose confidence sits within that of τ
  may exit differently here than in the deployment.
* **Gradient** — exact closed form. For ``logits = W e + b`` and ``L = CE(logits, y)``,
  ``∂L/∂W = (softmax(logits) − onehot(y)) ⊗ e``: a rank-1 (C, E) matrix per sample, computed
  independently for every sample (the reference accumulated ``.grad`` across samples without zeroing
  it — a bug; tests check equality with per-sample autograd). Flattened row-major like
  ``weight.grad.flatten()``. Because it is rank-1, it carries no information beyond (probs, label,
  embedding); ``gradient="norm"`` skips the (n, C·E) array (which for 10 000 TinyImageNet samples
  with E = 1024 would be 8 GB) and :func:`last_layer_gradient` rebuilds it batch by batch on demand.
* **Embedding widths** — every head of the mexit zoo has the same embedding width within a model
  (512, or 1024 for MobileNetV2 and for VGG-16 on 200 classes, final head included; checked for all
  architectures). Should a model's exits differ, embeddings are zero-padded on the right to the
  widest exit (and the gradient to ``C × E_max``), and ``embedding_widths`` says which width each exit
  really has. Zero-padding (rather than the reference's tiling) adds no spurious values.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from mexit.errors import InputError
from mexit.runtime.policy import ExitPolicy
from mexit.train.multiexit import MultiExitNet

logger = logging.getLogger(__name__)

_LARGE_BYTES = 2 << 30


def _embedding_width(head: torch.nn.Module) -> int:
    return int(head.classifier.weight.shape[1])


def last_layer_gradient(probs: np.ndarray, labels: np.ndarray, embedding: np.ndarray) -> np.ndarray:
    """Per-sample ``∂CE/∂W`` of a last Linear layer, flattened (n, C·E) float32: ``(p − onehot(y)) ⊗ e``."""
    p = np.asarray(probs, dtype=np.float32)
    e = np.asarray(embedding, dtype=np.float32)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim != 2 or e.ndim != 2 or len(p) != len(e) or y.shape != (len(p),):
        raise InputError(f"need probs (n, C), labels (n,) and embedding (n, E), got {p.shape}, {y.shape}, {e.shape}")
    delta = p.copy()
    delta[np.arange(len(y)), y] -= 1.0
    return (delta[:, :, None] * e[:, None, :]).reshape(len(p), -1)


def whitebox_signals(
    model: MultiExitNet,
    x: np.ndarray,
    y: np.ndarray,
    *,
    threshold: float,
    policy: str = "max_prob",
    batch_size: int = 256,
    gradient: Literal["full", "norm"] = "full",
) -> dict[str, Any]:
    """Per-sample exit, probabilities, loss, embedding and last-layer gradient of the taken exit.

    Returns ``exit_index`` (n,) int64, ``probs`` (n, C), ``loss`` (n,), ``embedding`` (n, E_max),
    ``gradient`` (n, C·E_max) or ``None`` with ``gradient="norm"``, ``gradient_norm`` (n,) (Frobenius
    norm, ``‖p − onehot(y)‖·‖e‖``), all float32, and ``embedding_widths`` (per exit). The model runs in
    eval mode (dropout off) on its own device; its train/eval mode is restored afterwards.
    """
    if gradient not in ("full", "norm"):
        raise InputError(f"gradient must be 'full' or 'norm', got {gradient!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    heads = list(model.heads)
    if not all(hasattr(h, "embedding") and isinstance(getattr(h, "classifier", None), torch.nn.Linear)
               for h in heads):
        raise InputError("white-box signals need ExitHead heads (with .embedding() and a Linear .classifier); "
                         "build the model with mexit.train (build_model / load_run)")
    rule = ExitPolicy(policy, float(threshold))
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y, dtype=np.int64)
    n = len(xs)
    if ys.shape != (n,):
        raise InputError(f"y must have one label per sample ({n}), got shape {ys.shape}")
    if n and (ys.min() < 0 or ys.max() >= model.num_classes):
        raise InputError(f"labels must lie in 0..{model.num_classes - 1}")
    widths = [_embedding_width(h) for h in heads]
    e_max = max(widths)
    if len(set(widths)) > 1:
        logger.info("exit embedding widths differ (%s): zero-padding to %d", widths, e_max)
    c = model.num_classes
    if gradient == "full" and n * c * e_max * 4 > _LARGE_BYTES:
        logger.warning("the full per-sample gradients take %.1f GB; gradient='norm' plus last_layer_gradient() on "
                       "demand avoids that", n * c * e_max * 4 / 1e9)

    exit_index = np.empty(n, dtype=np.int64)
    probs = np.empty((n, c), dtype=np.float32)
    loss = np.empty(n, dtype=np.float32)
    embedding = np.zeros((n, e_max), dtype=np.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    last = model.num_exits - 1
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                stop = min(n, start + batch_size)
                h = torch.from_numpy(xs[start:stop]).to(device)
                rows = np.arange(start, stop)
                for k, (stage, head) in enumerate(zip(model.stages, heads, strict=True)):
                    h = stage(h)
                    emb = head.embedding(h)
                    logits = head.classifier(emb)  # == head(h) in eval mode (dropout is the identity)
                    p = torch.softmax(logits.float(), dim=1)
                    p_np = p.cpu().numpy()
                    leave = np.ones(len(rows), dtype=bool) if k == last else rule.exits(p_np)
                    if leave.any():
                        sel = torch.from_numpy(np.flatnonzero(leave)).to(device)
                        out = rows[leave]
                        exit_index[out] = k
                        probs[out] = p_np[leave]
                        target = torch.from_numpy(ys[out]).to(device)
                        loss[out] = F.cross_entropy(logits[sel].float(), target, reduction="none").cpu().numpy()
                        embedding[out, : widths[k]] = emb[sel].float().flatten(1).cpu().numpy()
                    if k == last or leave.all():
                        break
                    stay = torch.from_numpy(np.flatnonzero(~leave)).to(device)
                    h = h[stay]
                    rows = rows[~leave]
    finally:
        model.train(was_training)

    delta = probs.copy()
    delta[np.arange(n), ys] -= 1.0
    gradient_norm = (np.linalg.norm(delta, axis=1) * np.linalg.norm(embedding, axis=1)).astype(np.float32)
    return {
        "exit_index": exit_index,
        "probs": probs,
        "loss": loss,
        "embedding": embedding,
        "gradient": last_layer_gradient(probs, ys, embedding) if gradient == "full" else None,
        "gradient_norm": gradient_norm,
        "embedding_widths": widths,
    }

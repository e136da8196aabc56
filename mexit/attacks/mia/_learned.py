"""Shared machinery of the learned (neural) attacks: seeded training with shadow-held-out model selection.

The reference trains every attack model for 100 epochs and reports the best epoch *on the target*; here
the optimiser and schedule are the reference's (SGD lr 1e-2, momentum 0.9, weight decay 5e-4, cosine
annealing over the epoch budget, cross-entropy on two outputs) but the epoch is chosen by AUC on a
seeded, stratified held-out part of the **shadow** signals, with early stopping once that AUC has not
improved for ``patience`` epochs. The decision threshold is chosen on the same held-out shadow part.

Features are kept as numpy arrays and turned into tensors one mini-batch at a time, so large white-box
gradients are never copied whole.
"""

from __future__ import annotations

import copy
import logging
from abc import abstractmethod
from typing import Any

import numpy as np

from mexit.attacks.mia.base import MembershipAttack, best_threshold, holdout_split
from mexit.attacks.signals import Signals
from mexit.errors import UserError

logger = logging.getLogger(__name__)

Features = dict[str, np.ndarray]
Scaling = dict[str, tuple[Any, Any]]


class LearnedAttack(MembershipAttack):
    """A torch attack model trained on shadow signals; ``score`` is the member-class softmax probability."""

    def __init__(
        self,
        *,
        seed: int = 0,
        max_epochs: int = 100,
        patience: int = 20,
        batch_size: int = 256,
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        holdout: float = 0.2,
    ) -> None:
        super().__init__(seed=seed)
        if max_epochs < 1 or patience < 1 or batch_size < 1 or not lr > 0:
            raise UserError(f"{self.name}: need max_epochs, patience, batch_size >= 1 and lr > 0, got "
                            f"{max_epochs}, {patience}, {batch_size}, {lr}")
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.holdout = holdout
        self.model_: Any = None
        self.scaling_: Scaling = {}
        self.selection_: dict[str, float] = {}

    # ------------------------------------------------------------------------------- for subclasses
    @abstractmethod
    def _features(self, signals: Signals) -> Features:
        """Raw per-sample feature arrays by branch name (views where possible, no copies of gradients)."""

    @abstractmethod
    def _build(self, signals: Signals) -> Any:
        """The untrained ``torch.nn.Module`` mapping a dict of batch tensors to two logits."""

    def _scaling(self, feats: Features, fit_idx: np.ndarray) -> Scaling:
        """Per-branch ``(shift, scale)`` estimated on the shadow fit part; identity by default."""
        return {}

    # ------------------------------------------------------------------------------------- template
    def _fit(self, shadow: Signals) -> None:
        import torch

        member = shadow.member.astype(bool)
        fit_idx, held_idx = holdout_split(member, self.holdout, self.seed)
        feats = self._features(shadow)
        self.scaling_ = self._scaling(feats, fit_idx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self._build(shadow)
            self.model_, self.selection_ = self._train(model, feats, member, fit_idx, held_idx)
        held_scores = self._predict(feats, held_idx)
        self.threshold_ = best_threshold(held_scores, member[held_idx])
        logger.info("%s attack: epoch %d selected on held-out shadow data (AUC %.4f), threshold %.4f",
                    self.name, self.selection_["epoch"], self.selection_["holdout_auc"], self.threshold_)

    def _score(self, target: Signals) -> np.ndarray:
        return self._predict(self._features(target), np.arange(len(target)))

    # ------------------------------------------------------------------------------------- internals
    def _batch(self, feats: Features, idx: np.ndarray) -> dict[str, Any]:
        import torch

        out = {}
        for name, arr in feats.items():
            part = np.asarray(arr[idx], dtype=np.float32)
            if name in self.scaling_:
                shift, scale = self.scaling_[name]
                part = (part - shift) / scale
            out[name] = torch.from_numpy(np.ascontiguousarray(part, dtype=np.float32))
        return out

    def _predict(self, feats: Features, idx: np.ndarray, model: Any = None) -> np.ndarray:
        import torch

        model = self.model_ if model is None else model
        model.eval()
        out = np.empty(len(idx), dtype=np.float64)
        step = max(self.batch_size, 1024)
        with torch.no_grad():
            for start in range(0, len(idx), step):
                logits = model(self._batch(feats, idx[start:start + step]))
                out[start:start + step] = torch.softmax(logits, dim=1)[:, 1].double().numpy()
        return out

    def _train(self, model: Any, feats: Features, member: np.ndarray, fit_idx: np.ndarray,
               held_idx: np.ndarray) -> tuple[Any, dict[str, float]]:
        import torch
        from sklearn.metrics import roc_auc_score

        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.max_epochs)
        loss_fn = torch.nn.CrossEntropyLoss()
        labels = torch.from_numpy(member.astype(np.int64))
        best_auc, best_epoch, best_state, stale = -np.inf, 0, copy.deepcopy(model.state_dict()), 0
        for epoch in range(1, self.max_epochs + 1):
            model.train()
            order = fit_idx[torch.randperm(len(fit_idx), generator=gen).numpy()]
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                opt.zero_grad()
                loss = loss_fn(model(self._batch(feats, idx)), labels[idx])
                loss.backward()
                opt.step()
            sched.step()
            auc = float(roc_auc_score(member[held_idx], self._predict(feats, held_idx, model)))
            if auc > best_auc + 1e-9:
                best_auc, best_epoch, best_state, stale = auc, epoch, copy.deepcopy(model.state_dict()), 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        model.load_state_dict(best_state)
        model.eval()
        return model, {"epoch": float(best_epoch), "holdout_auc": best_auc, "epochs_run": float(epoch)}


def standardise(arr: np.ndarray, idx: np.ndarray, *, per_feature: bool = True,
                chunk: int = 1024) -> tuple[Any, Any]:
    """``(mean, std)`` of ``arr[idx]``, per column or one scalar for the whole array; a zero std becomes 1.

    Accumulated in chunks so that a large gradient matrix is never copied whole.
    """
    total = total_sq = 0.0
    count = 0
    for start in range(0, len(idx), chunk):
        part = np.asarray(arr[idx[start:start + chunk]], dtype=np.float64)
        part = part.reshape(part.shape[0], -1)
        axis = 0 if per_feature else None
        total = total + part.sum(axis=axis)
        total_sq = total_sq + np.square(part).sum(axis=axis)
        count += part.shape[0] if per_feature else part.size
    mean = np.asarray(total) / count
    std = np.sqrt(np.maximum(np.asarray(total_sq) / count - mean ** 2, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    if per_feature:
        return mean.reshape(arr.shape[1:]).astype(np.float32), std.reshape(arr.shape[1:]).astype(np.float32)
    return np.float32(mean), np.float32(std)

"""A tiny, deliberately overfitted two-exit model world for the membership-attack tests.

Binary features (so the random-flip label-only attack applies), noisy labels (so members are memorised
and non-members are not), a shadow and a target model trained the same way on disjoint data, and the
Signals an attacker would record from each: probabilities, loss, observed exit, white-box embedding and
last-layer gradient, and label-only flip robustness measured through a label-only LocalClient.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from functools import cache, lru_cache

import numpy as np

from mexit.attacks.mia import MembershipAttack
from mexit.attacks.signals import Signals, cross_entropy
from mexit.runtime.types import Prediction
from mexit.serve.client import LocalClient

from ._reference_world import reference_arrays

D, C, E, HIDDEN = 24, 4, 16, 64
N_PER_PART = 300
TAU = 0.99


def make_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 4 * N_PER_PART
    x = rng.integers(0, 2, size=(n, D)).astype(np.float32)
    w = rng.normal(size=(D, C))
    logits = (x - 0.5) @ w + rng.normal(scale=2.0, size=(n, C))
    return x, logits.argmax(axis=1).astype(np.int64)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@dataclass
class TinyTwoExit:
    """Numpy weights of a trained two-exit MLP; ``exits(x)`` gives per-exit probabilities and embeddings."""

    w: dict[str, np.ndarray]

    def exits(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
        h0 = relu(x @ self.w["s0.w"] + self.w["s0.b"])
        h1 = relu(h0 @ self.w["s1.w"] + self.w["s1.b"])
        out = []
        for k, h in enumerate((h0, h1)):
            emb = relu(h @ self.w[f"e{k}.w"] + self.w[f"e{k}.b"])
            out.append((_softmax(emb @ self.w[f"o{k}.w"] + self.w[f"o{k}.b"]), emb.astype(np.float32)))
        return out


def train_model(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 200) -> TinyTwoExit:
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        s0, s1 = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        e0, e1 = nn.Linear(HIDDEN, E), nn.Linear(HIDDEN, E)
        o0, o1 = nn.Linear(E, C), nn.Linear(E, C)
        mods = nn.ModuleList([s0, s1, e0, e1, o0, o1])
        opt = torch.optim.Adam(mods.parameters(), lr=1e-2)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        for _ in range(epochs):
            opt.zero_grad()
            h0 = torch.relu(s0(xt))
            h1 = torch.relu(s1(h0))
            loss = nn.functional.cross_entropy(o0(torch.relu(e0(h0))), yt) + nn.functional.cross_entropy(
                o1(torch.relu(e1(h1))), yt)
            loss.backward()
            opt.step()
    w = {}
    for name, mod in zip(("s0", "s1", "e0", "e1", "o0", "o1"), mods, strict=True):
        w[f"{name}.w"] = mod.weight.detach().numpy().T.copy()
        w[f"{name}.b"] = mod.bias.detach().numpy().copy()
    return TinyTwoExit(w)


class TinyRuntime:
    """The Runtime protocol over a :class:`TinyTwoExit`: exit 0 when its top probability >= TAU, per sample."""

    input_shape = (D,)
    num_classes = C
    num_exits = 2

    def __init__(self, model: TinyTwoExit, tau: float = TAU) -> None:
        self.model = model
        self.tau = tau
        self.rows = 0

    def predict(self, x: np.ndarray, *, full_depth: bool = False) -> Prediction:
        start = time.perf_counter_ns()
        x = np.asarray(x, dtype=np.float32)
        self.rows += len(x)
        (p0, _), (p1, _) = self.model.exits(x)
        exit_index = np.where((p0.max(axis=1) >= self.tau) & (not full_depth), 0, 1).astype(np.int64)
        probs = np.where(exit_index[:, None] == 0, p0, p1)
        lat = np.full(len(x), time.perf_counter_ns() - start, dtype=np.int64)
        return Prediction(probs=probs, labels=probs.argmax(axis=1).astype(np.int64), exit_index=exit_index,
                          latency_ns=lat)


def record(model: TinyTwoExit, x: np.ndarray, y: np.ndarray, member: np.ndarray, role: str,
           label_only_score: np.ndarray | None = None) -> Signals:
    """Everything an (Adversary 1, white-box) attacker records; ``true_exit`` equals the exposed exit."""
    (p0, e0), (p1, e1) = model.exits(x)
    exit_index = np.where(p0.max(axis=1) >= TAU, 0, 1).astype(np.int64)
    first = exit_index[:, None] == 0
    probs = np.where(first, p0, p1).astype(np.float32)
    emb = np.where(first, e0, e1).astype(np.float32)
    grad = ((probs - np.eye(C, dtype=np.float32)[y])[:, :, None] * emb[:, None, :]).reshape(len(x), C * E)
    return Signals(member=member.astype(bool), true_label=y, pred_label=probs.argmax(axis=1).astype(np.int64),
                   sample_index=np.arange(len(x)), num_exits=2, num_classes=C, probs=probs,
                   loss=cross_entropy(probs, y), exit_index=exit_index, true_exit=exit_index.copy(),
                   embedding=emb, gradient=grad.astype(np.float32), label_only_score=label_only_score,
                   meta={"role": role, "gradient_shape": [C, E]})


@dataclass(frozen=True)
class World:
    shadow: Signals
    target: Signals
    shadow_client: LocalClient
    target_client: LocalClient
    shadow_xy: tuple[np.ndarray, np.ndarray, np.ndarray]
    target_xy: tuple[np.ndarray, np.ndarray, np.ndarray]
    flip_probability: float


@lru_cache(maxsize=1)
def world() -> World:
    """Built once per test session (about a second with one BLAS/torch thread)."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return _build_world()
    finally:
        torch.set_num_threads(threads)


def _build_world() -> World:
    from mexit.attacks.mia.label_only import choose_flip_probability, flip_robustness

    x, y = make_data(0)
    parts = np.split(np.random.default_rng(1).permutation(len(x)), 4)
    out = {}
    for role, (train, test), seed in (("shadow", (parts[0], parts[1]), 10), ("target", (parts[2], parts[3]), 20)):
        model = train_model(x[train], y[train], seed)
        idx = np.concatenate([train, test])
        member = np.r_[np.ones(len(train), bool), np.zeros(len(test), bool)]
        client = LocalClient(TinyRuntime(model), expose="label")
        out[role] = (model, x[idx], y[idx], member, client, idx)
    _, xs, ys, ms, shadow_client, _ = out["shadow"]
    choice = choose_flip_probability(shadow_client, xs, ys, ms, n_noisy=100, seed=0)
    signals = {}
    for role, (model, xr, yr, mr, client, idx) in out.items():
        lo = choice.shadow_scores if role == "shadow" else flip_robustness(
            client, xr, yr, flip_probability=choice.flip_probability, n_noisy=100, seed=1)
        signals[role] = replace(record(model, xr, yr, mr, role, lo), **reference_arrays(xr, yr, idx))
    return World(signals["shadow"], signals["target"], out["shadow"][4], out["target"][4],
                 (xs, ys, ms), (out["target"][1], out["target"][2], out["target"][3]), choice.flip_probability)


def without_membership_signal(signals: Signals, seed: int) -> Signals:
    """The same observations with membership labels permuted: members and non-members are exchangeable."""
    return replace(signals, member=np.random.default_rng(seed).permutation(signals.member))


#: Training budgets that keep the learned attacks to a few seconds on two shared cores.
FAST: dict[str, dict[str, int]] = {
    "score": {"max_epochs": 30, "patience": 10},
    "score-hybrid": {"max_epochs": 30, "patience": 10},
    "gradient": {"max_epochs": 20, "patience": 8},
    "gradient-hybrid": {"max_epochs": 20, "patience": 8},
}


@cache
def fitted(name: str, *, null: bool = False, seed: int = 0) -> MembershipAttack:
    """The attack ``name`` fitted on the world's shadow signals (or their membership-free version), cached."""
    import torch
    from threadpoolctl import threadpool_limits

    from mexit.attacks.mia import get_attack

    shadow = without_membership_signal(world().shadow, 1) if null else world().shadow
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return get_attack(name, seed=seed, **FAST.get(name, {})).fit(shadow)
    finally:
        torch.set_num_threads(threads)


def null_target() -> Signals:
    return without_membership_signal(world().target, 2)

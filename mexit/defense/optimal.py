"""The optimal exit-private release schedule: the cheapest delay policy whose Bayes stealer is within ε of chance.

Given the exit shares π_k and each exit's high clean-time quantile ``L_k`` (so the release almost never
falls before the compute is done), choose for every exit ``k`` in use a distribution ``q_k`` over a grid of
release times ``t_j ≥ L_k`` that minimises the mean latency ``Σ_k π_k Σ_j q_kj t_j`` subject to the
Bayes stealer's balanced accuracy ``(1/K) Σ_j max_k q_kj ≤ 1/K + ε``. With auxiliaries ``a_j ≥ q_kj`` the
bound is linear (``Σ_j a_j ≤ 1 + Kε``), so this is a linear program, solved with
``scipy.optimize.linprog`` (HiGHS). ε = 0 forces every ``q_k`` to be equal, i.e. padding to ``max_k L_k``;
larger ε lets shallow exits release earlier, along the cheapest possible latency/privacy frontier —
TimeGuard's points lie on or above it.

Why the bound is on the Bayes stealer and not differential privacy over exits: pure ε-DP would require
every exit's release distribution to dominate every other's within a factor ``e^ε`` at *every* time, and
a release before the slowest exit's compute time has probability 0 for that exit, so every exit would
have to release above the slowest exit's time — padding, whatever ε (cf. Ratliff & Vadhan's
timing-privacy framework, arXiv 2409.05623). The Bayes bound is what an exit-stealing adversary can
actually reach, which is what the membership attacks feed on.

The release is deterministic per input: the keyed HKDF uniform ``u(x)`` that TimeGuard derives (with its
own context, so the two policies' delays are unrelated) goes through ``q_k``'s inverse CDF, so repeated
queries of one input always see the same release and learn nothing new.

An exit no calibration input took (share 0) is not part of the program; should an input take it at
serving time it is released like the next deeper exit in use (or the slowest one in use), which errs
towards more delay (:meth:`mexit.defense.calibration.CleanTimes.filled` does the same for clean times).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import optimize, sparse

from mexit.defense.bayes import schedule_bound
from mexit.defense.calibration import CleanTimes, check_quantile
from mexit.defense.hashing import InputHasher
from mexit.defense.padding import DEFAULT_QUANTILE
from mexit.defense.timeguard import TimeGuard, _check_exits
from mexit.errors import ConfigError

OPTIMAL_CONTEXT = b"mexit-optimal-v1"
DEFAULT_GRID = 128
P99_SHARE = 0.01


def check_epsilon(epsilon: float, num_exits_used: int) -> float:
    """ε as a float in ``[0, 1 − 1/K]``, or a one-line ConfigError (a bound above 1 means nothing)."""
    eps = float(epsilon)
    top = 1.0 - 1.0 / max(num_exits_used, 1)
    if not (math.isfinite(eps) and 0.0 <= eps <= top + 1e-12):
        raise ConfigError(f"optimal schedule epsilon must lie in [0, {top:.4g}] (1 - 1/K for the K = {num_exits_used} "
                          f"exits in use), got {epsilon!r}")
    return eps


def solve_schedule(shares: np.ndarray, lower_s: np.ndarray, epsilon: float, *, grid_points: int = DEFAULT_GRID,
                   p99_s: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Solve the LP for the exits given (all in use): release grid ``t (M,)`` and schedule ``q (K, M)``.

    ``shares`` π_k (> 0, normalised here), ``lower_s`` the earliest release per exit ``L_k``. ``p99_s``
    optionally keeps at most 1 % of responses released after it.
    """
    pi = np.asarray(shares, dtype=np.float64)
    low = np.asarray(lower_s, dtype=np.float64)
    k_used = pi.size
    if k_used == 0 or low.shape != pi.shape or np.any(pi <= 0) or not np.all(np.isfinite(low)):
        raise ConfigError("the optimal schedule needs a positive share and a finite clean-time quantile per exit")
    pi = pi / pi.sum()
    eps = check_epsilon(epsilon, k_used)
    if grid_points < 2:
        raise ConfigError(f"grid_points must be >= 2, got {grid_points}")
    t = np.unique(np.concatenate([low, np.linspace(low.min(), low.max(), grid_points)]))
    m = t.size
    nq = k_used * m
    # Objective: mean release time; auxiliaries a_j cost nothing.
    c = np.concatenate([(pi[:, None] * t[None, :]).ravel(), np.zeros(m)])
    # q_kj - a_j <= 0 for every k, j; sum_j a_j <= 1 + K eps.
    eye_m = sparse.identity(m, format="csr")
    a_pair = sparse.hstack([sparse.identity(nq, format="csr"), -sparse.vstack([eye_m] * k_used)])
    a_sum = sparse.hstack([sparse.csr_matrix((1, nq)), sparse.csr_matrix(np.ones((1, m)))])
    rows = [a_pair, a_sum]
    b = [np.zeros(nq), np.array([1.0 + k_used * eps])]
    if p99_s is not None:
        late = (t > float(p99_s)).astype(np.float64)
        rows.append(sparse.hstack([sparse.csr_matrix((pi[:, None] * late[None, :]).reshape(1, -1)),
                                   sparse.csr_matrix((1, m))]))
        b.append(np.array([P99_SHARE]))
    a_ub = sparse.vstack(rows, format="csr")
    a_eq = sparse.hstack([sparse.kron(sparse.identity(k_used), np.ones((1, m))), sparse.csr_matrix((k_used, m))])
    bounds = [(0.0, 0.0 if t[j] < low[k] else 1.0) for k in range(k_used) for j in range(m)] + [(0.0, 1.0)] * m
    res = optimize.linprog(c, A_ub=a_ub, b_ub=np.concatenate(b), A_eq=a_eq, b_eq=np.ones(k_used), bounds=bounds,
                           method="highs")
    if res.status != 0:
        why = "the p99 limit is below what the bound allows" if p99_s is not None else res.message
        raise ConfigError(f"the optimal schedule has no solution at epsilon={eps:g} ({why}); raise p99_ms or epsilon")
    q = np.clip(res.x[:nq].reshape(k_used, m), 0.0, None)
    return t, q / q.sum(axis=1, keepdims=True)


class OptimalSchedule:
    """The LP-optimal release schedule at Bayes bound ``1/K + ε``; a DelayPolicy (call :meth:`fit` first).

    ``key`` >= 32 secret bytes and ``hasher`` as for :class:`~mexit.defense.timeguard.TimeGuard`;
    ``quantile`` of each exit's clean time is its earliest release; ``p99_ms`` optionally caps the p99.
    """

    def __init__(self, epsilon: float, key: bytes, hasher: InputHasher, *, quantile: float = DEFAULT_QUANTILE,
                 margin_s: float = 0.0, p99_s: float | None = None, grid_points: int = DEFAULT_GRID,
                 context: bytes = OPTIMAL_CONTEXT) -> None:
        eps = float(epsilon)
        if not (math.isfinite(eps) and 0.0 <= eps < 1.0):  # the exact upper end 1 - 1/K is checked at fit
            raise ConfigError(f"optimal schedule epsilon must lie in [0, 1 - 1/K], got {epsilon!r}")
        self.epsilon = eps
        self.quantile = check_quantile(quantile, "optimal schedule quantile")
        if not (math.isfinite(float(margin_s)) and float(margin_s) >= 0):
            raise ConfigError(f"optimal schedule margin must be a finite number of seconds >= 0, got {margin_s!r}")
        self.margin_s = float(margin_s)
        if p99_s is not None and not (math.isfinite(float(p99_s)) and float(p99_s) > 0):
            raise ConfigError(f"optimal schedule p99 limit must be a positive number of seconds, got {p99_s!r}")
        self.p99_s = None if p99_s is None else float(p99_s)
        self.grid_points = int(grid_points)
        self._uniform = TimeGuard(0.0, key, hasher, context=context)  # only its keyed uniform is used
        self.hasher = hasher
        self.grid_s: np.ndarray | None = None
        self.schedule: np.ndarray | None = None  # (num_exits, M): every exit, unused ones borrowed
        self.shares: np.ndarray | None = None
        self.used: np.ndarray | None = None
        self.bound: float | None = None

    def fit(self, clean: CleanTimes) -> OptimalSchedule:
        """Solve the program for the calibrated shares and quantiles."""
        shares = clean.shares if clean.counts.sum() else clean.seen / clean.seen.sum()
        used = np.flatnonzero(shares > 0)
        check_epsilon(self.epsilon, used.size)
        low = clean.quantiles(self.quantile) + self.margin_s
        t, q_used = solve_schedule(shares[used], low[used], self.epsilon, grid_points=self.grid_points,
                                   p99_s=self.p99_s)
        full = np.empty((clean.num_exits, t.size))
        full[used] = q_used
        slowest = int(used[np.argmax(low[used])])
        for k in range(clean.num_exits):
            if k not in used:
                deeper = used[used > k]
                full[k] = full[int(deeper[0]) if deeper.size else slowest]
        self.grid_s, self.schedule, self.shares, self.used = t, full, shares, used
        self.bound = schedule_bound(q_used)
        self._cdf = np.cumsum(full, axis=1)
        self._cdf[:, -1] = 1.0
        return self

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self.grid_s is None or self.schedule is None:
            raise ConfigError("the optimal schedule is not calibrated: call fit(CleanTimes) (GuardedRuntime does this)")
        return self.grid_s, self._cdf

    def release_for(self, u: np.ndarray, exits: np.ndarray) -> np.ndarray:
        """Release time for uniforms ``u`` at ``exits``: ``q_k``'s inverse CDF (smallest t_j with CDF ≥ u)."""
        t, cdf = self._fitted()
        idx = np.array([np.searchsorted(cdf[int(k)], float(v), side="left") for v, k in zip(u, exits, strict=True)],
                       dtype=np.int64)
        return t[np.minimum(idx, t.size - 1)]

    def target_latency_s(self, x_batch: np.ndarray, exit_index: np.ndarray, clean_times_s: np.ndarray) -> np.ndarray:
        self._fitted()
        batch = np.asarray(x_batch)
        exits = _check_exits(exit_index, batch.shape[0], self._cdf.shape[0])
        u = np.array([self._uniform.uniform(row) for row in batch], dtype=np.float64)
        return self.release_for(u, exits)

    def release_cdf(self, exit_k: int, grid_s: np.ndarray, clean_times_s: np.ndarray | None = None) -> np.ndarray:
        """CDF over inputs of exit ``exit_k``'s release time on ``grid_s`` (a step function)."""
        t, cdf = self._fitted()
        idx = np.searchsorted(t, np.asarray(grid_s, dtype=np.float64), side="right") - 1
        return np.where(idx >= 0, cdf[int(exit_k)][np.maximum(idx, 0)], 0.0)

    def mean_release_s(self) -> float:
        """Expected release time under the calibrated shares."""
        t, _ = self._fitted()
        assert self.schedule is not None and self.shares is not None
        return float(self.shares @ self.schedule @ t)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy": "optimal", "epsilon": self.epsilon, "quantile": self.quantile,
                               "margin_s": self.margin_s, "p99_s": self.p99_s, "hasher": self.hasher.name,
                               "grid_points": self.grid_points}
        if self.grid_s is not None:
            out.update(bayes_bound=self.bound, exits_in_use=(self.used.tolist() if self.used is not None else None),
                       mean_release_s=self.mean_release_s(),
                       earliest_release_s=float(self.grid_s[np.argmax(self._cdf > 0, axis=1)].min()))
        return out

    def __repr__(self) -> str:
        return (f"OptimalSchedule(epsilon={self.epsilon!r}, quantile={self.quantile!r}, p99_s={self.p99_s!r}, "
                "key=<redacted>)")

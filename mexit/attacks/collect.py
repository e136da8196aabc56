"""Collect :class:`~mexit.attacks.signals.Signals` by querying a deployment, one sample per request.

Timing attacks need each sample's own response time, so every request carries exactly one sample
(a batch would time the slowest sample of the batch). Each sample is queried ``repeats`` times; the
repeats are organised in rounds, and every round visits all samples in a fresh, seeded random order,
so slow drift of the host (thermal, other tenants) spreads evenly over samples instead of
biasing whichever samples came last. ``warmup`` queries run first and are not recorded (first calls
pay for lazy initialisation, caches, connection set-up).

What is recorded is what the client returns, nothing more: ``probabilities`` (→ ``probs`` and the
attacker-side cross-entropy ``loss``), ``label`` (→ ``pred_label``), ``exit_index`` when the
deployment exposes it (→ ``exit_index``, ``meta["exit_source"] = "exposed"``), and the client's
round-trip time of every query (→ ``latency_ns`` (n, repeats), column r = round r). A deterministic
deployment answers the same to every repeat; a changed answer is counted, logged and, with
``on_inconsistent="raise"``, refused.

``true_exit_runtime`` is an in-process runtime on the same bundle, used only to record the ground-truth
exit (``true_exit``) for *evaluating* exit stealing; the runtime decides exits per sample, so its batch
answer equals the served one-sample answers (a mismatch with exposed exits is logged and noted in meta).

Adaptive querying (``adaptive=Adaptive(model, query_budget=B)``, opt-in): after ``min_queries`` rounds only
the samples whose exit posterior under the shadow-fitted timing model
(:func:`~mexit.attacks.stealing.fit_timing_model`) is still uncertain are queried again, until the mean
budget ``B`` per sample is spent; ``latency_ns`` is then float64, NaN-padded. :func:`collect_interleaved`
queries several deployments (shadow and target) in one randomised schedule, so the host's speed drift
falls on both alike. A query answered with a 5xx or not at all is retried with exponential backoff and,
if it still fails, lost (NaN, counted in ``meta["lost_queries"]``); too many lost queries stop the
collection with one line. Timings that do not vary between samples (constant-time padding) are reported
(``meta["timing_informative"]``).

Long collections are resumable: with ``checkpoint_path`` the progress is written atomically every
``checkpoint_every_s`` seconds and when the collection is interrupted; a re-run with the same samples,
seed, repeats and target continues where it stopped (the checkpoint of a finished run is kept, so a
re-run returns at once; delete it once the signals are saved). A checkpoint made with other arguments
is refused with a :class:`SignalsError` naming the difference.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from scipy import stats

from mexit._io import load_npz, provenance, save_npz
from mexit.attacks.pacing import RETRYABLE, PacerCalibration, ShadowPacer, target_drift
from mexit.attacks.signals import Signals, SignalsError, cross_entropy
from mexit.attacks.stealing import ExitTimingModel, replay_sequential, sequential_stop
from mexit.runtime.types import Runtime
from mexit.serve.client import ServerError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
#: The largest mean query budget per sample adaptive querying accepts (beyond it, timing is not the channel).
MAX_QUERY_BUDGET = 200
OUT_PROBS, OUT_LABEL, OUT_EXIT = "probabilities", "label", "exit_index"
_HOW_TO_EXPOSE = {
    OUT_PROBS: "serve it with --expose probabilities (score-based adversary)",
    OUT_EXIT: "serve it with --expose-exit (the paper's Adversary 1), or steal exits from latency",
    OUT_LABEL: "is it an OIP server for a classifier?",
}


class InferClient(Protocol):
    """What collection needs from a client: :class:`~mexit.serve.OIPClient` and ``LocalClient`` have it."""

    def infer(self, x: np.ndarray, outputs: list[str] | None = None) -> Any: ...


def _round_order(seed: int, round_index: int, n: int) -> np.ndarray:
    """The visiting order of round ``round_index``: a function of (seed, round) only, so a resume replays it."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, round_index))).permutation(n)


def _samples_digest(x: np.ndarray, y: np.ndarray, member: np.ndarray, sample_index: np.ndarray) -> str:
    h = hashlib.sha256()
    for arr in (x, y, member, sample_index):
        a = np.ascontiguousarray(arr)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _target_name(client: Any) -> str:
    return f"{getattr(client, 'url', type(client).__name__)}#{getattr(client, 'model_name', '')}"


class _Progress:
    """The per-sample answers and timings collected so far (the checkpoint's content).

    ``latency[i, r]`` is the round-trip time of sample ``i``'s query in round ``r``, -1 where none was
    recorded (not yet asked, lost to errors, or, when querying adaptively, not needed).
    """

    def __init__(self, n: int, repeats: int) -> None:
        self.latency = np.full((n, repeats), -1, dtype=np.int64)
        self.attempted = np.zeros((n, repeats), dtype=bool)
        self.labels = np.full(n, -1, dtype=np.int64)
        self.exits = np.full(n, -1, dtype=np.int64)
        self.probs: np.ndarray | None = None
        self.inconsistent = np.zeros(n, dtype=bool)
        self.outputs: list[str] = []
        self.lost = 0
        self.retried = 0
        self.extra: dict[str, Any] = {}  # adaptive querying: the offset estimated after the first rounds
        # paced adaptive querying: the index of the shadow answer that followed each target query; the pacer
        # whose answers (shadow row, round-trip ns) the checkpoint keeps, and those read back from one, so a
        # resumed run keeps measuring the drift on one log
        self.pace_at = np.full((n, repeats), -1, dtype=np.int64)
        self.pacer: ShadowPacer | None = None
        self.loaded_pacer: tuple[np.ndarray, np.ndarray] | None = None

    def done(self) -> int:
        return int((self.latency >= 0).sum())

    def save(self, path: Path, fingerprint: dict[str, Any]) -> None:
        header = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "outputs": self.outputs,
                  "lost": self.lost, "retried": self.retried, "extra": self.extra}
        arrays = {"latency": self.latency, "labels": self.labels, "exits": self.exits,
                  "inconsistent": self.inconsistent}
        if self.probs is not None:
            arrays["probs"] = self.probs
        if self.pacer is not None and (self.pace_at >= 0).any():
            rows, rtt = self.pacer.answers
            arrays.update(pace_at=self.pace_at, pacer_rows=rows, pacer_rtt=rtt)
        save_npz(path, arrays, header)

    @classmethod
    def load(cls, path: Path, fingerprint: dict[str, Any]) -> _Progress:
        try:
            header, arrays = load_npz(path)
        except ValueError as exc:
            raise SignalsError(f"{path} is not a readable collection checkpoint ({exc}); delete it to start "
                               f"over") from None
        if header.get("format") != CHECKPOINT_FORMAT:
            raise SignalsError(f"{path} is a collection checkpoint of format {header.get('format')}, this mexit "
                               f"writes {CHECKPOINT_FORMAT}; delete it to start over")
        theirs = header.get("fingerprint", {})
        diffs = [f"{k}: checkpoint {theirs.get(k)!r}, now {v!r}" for k, v in fingerprint.items()
                 if theirs.get(k) != v]
        if diffs:
            raise SignalsError(f"the checkpoint {path} was made with different arguments ({'; '.join(diffs)}); "
                               f"pass the same samples, seed, repeats and target to resume, or delete it to start "
                               f"over")
        prog = cls(*arrays["latency"].shape)
        prog.latency, prog.labels, prog.exits = arrays["latency"], arrays["labels"], arrays["exits"]
        prog.attempted = prog.latency >= 0  # lost queries of the interrupted run are asked again
        prog.inconsistent = arrays["inconsistent"]
        prog.probs = arrays.get("probs")
        if "pace_at" in arrays:
            prog.pace_at, prog.loaded_pacer = arrays["pace_at"], (arrays["pacer_rows"], arrays["pacer_rtt"])
        prog.outputs = list(header.get("outputs", []))
        prog.retried = int(header.get("retried", 0))
        prog.extra = dict(header.get("extra", {}))
        return prog


@dataclass(frozen=True)
class Adaptive:
    """Adaptive querying: repeats per sample follow the evidence instead of a constant.

    Every sample is queried ``min_queries`` times; then, round after round, only the samples whose exit
    posterior under ``model`` (the shadow-fitted :class:`~mexit.attacks.stealing.ExitTimingModel`) is
    still below ``confidence`` are queried again (:func:`~mexit.attacks.stealing.sequential_stop`), until
    the mean number of queries per sample reaches ``query_budget`` or a sample reaches ``max_per_sample``
    (default ``4 · query_budget``). After the first rounds the offset between the target's timings and the
    model's (a slower serving stack) is estimated, and again each time the target has answered one more query
    per sample (``offset=False``: trust absolute times; :func:`_offset_due`).
    Fit ``model`` with :func:`~mexit.attacks.stealing.fit_timing_model` on the shadow's fixed-repeat timings;
    :func:`~mexit.attacks.stealing.describe_jitter` says beforehand how many queries the target will need.

    ``pace``: called after every target query (a :class:`ShadowPacer`): a query to the attacker's own
    shadow deployment, so that the host sees mixed traffic as when shadow and target were recorded
    together. A deployment queried alone answers faster (its weights
    stay in cache): unpaced, the jittery Location target looked 0.42 ms faster than its shadow, about two
    exit gaps, and the offset estimate followed it (``docs/results.md``, rec8). A pacer that knows its
    shadow's exits (``ShadowPacer(..., exits=...)``) also measures the host's drift and the per-exit centres
    on today's clock (:mod:`mexit.attacks.pacing`); with ``drift_correction`` (default) every decision is
    made against those centres and, when the target's repeats move with the drift, reads the target's timings
    less the drift at their moment; the signals keep the drift (``Signals.latency_drift_ns``) for the
    stealers. ``spend_budget`` (default): when every sample is confident before the budget is spent, the least
    certain are asked again at a stricter confidence (:func:`_spend_rest`) instead of leaving it unused.

    ``round_queries``: the fewest queries between two decisions. When fewer samples are still uncertain, each
    gets several consecutive slots in the round (asked in turn), so the decision steps stay rare: while the
    client decides (~10 ms) the servers idle, and the target's next answers came out 0.2–0.6 ms slower,
    more at deeper exits, for several queries (``benchmarks/decision_pause.py``). With one query per sample a
    round, the last rounds hold a handful of rare-exit samples and most of their queries follow such a pause.
    """

    model: ExitTimingModel
    query_budget: float
    confidence: float = 0.95
    min_queries: int = 0  # 0: two queries, or one with a budget below 2
    max_per_sample: int | None = None
    offset: bool = True
    pace: Callable[[], None] | None = field(default=None, compare=False)
    drift_correction: bool = True
    spend_budget: bool = True
    round_queries: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.query_budget <= MAX_QUERY_BUDGET:
            raise SignalsError(f"the query budget must be between 1 and {MAX_QUERY_BUDGET} queries per sample on "
                               f"average, got {self.query_budget}")
        if self.min_queries == 0:
            object.__setattr__(self, "min_queries", 2 if self.query_budget >= 2 else 1)
        if not 0 < self.confidence < 1:
            raise SignalsError(f"the stopping confidence must lie in (0, 1), got {self.confidence}")
        if not 1 <= self.min_queries <= self.query_budget:
            raise SignalsError(f"min_queries must be >= 1 and at most the query budget ({self.query_budget}), got "
                               f"{self.min_queries}")
        if self.round_queries < 1:
            raise SignalsError(f"round_queries must be at least 1, got {self.round_queries}")
        if self.max_per_sample is not None and self.max_per_sample < self.min_queries:
            raise SignalsError(f"max_per_sample ({self.max_per_sample}) is below min_queries ({self.min_queries})")

    @property
    def width(self) -> int:
        """Slots per sample: the most queries one sample may get."""
        cap = self.max_per_sample or math.ceil(4 * self.query_budget)
        return int(min(max(cap, self.min_queries), 4 * MAX_QUERY_BUDGET))

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256(np.ascontiguousarray(self.model.centres).tobytes()).hexdigest()[:16]
        return {"query_budget": float(self.query_budget), "confidence": float(self.confidence),
                "min_queries": int(self.min_queries), "max_per_sample": self.width, "model": digest,
                "offset": bool(self.offset), "drift_correction": self.calibrating,
                "spend_budget": bool(self.spend_budget), "round_queries": int(self.round_queries)}

    @property
    def calibrating(self) -> bool:
        """Whether decisions use the pacer's drift and centres (a resumed run must decide the same way)."""
        return bool(self.drift_correction and isinstance(self.pace, ShadowPacer) and self.pace.calibrates)


@dataclass
class Deployment:
    """One deployment to query in an interleaved schedule (:func:`collect_interleaved`)."""

    client: InferClient
    x: np.ndarray
    y: np.ndarray
    member: np.ndarray
    sample_index: np.ndarray | None = None
    true_exit_runtime: Runtime | None = None
    meta: dict[str, Any] | None = None
    num_exits: int | None = None
    num_classes: int | None = None


@dataclass
class _Options:
    """How queries are sent: retries on server errors, the share of lost queries tolerated, inconsistency."""

    require: Sequence[str] = ()
    on_inconsistent: str = "warn"
    retries: int = 3
    backoff_s: float = 0.05
    max_lost_fraction: float = 0.2
    progress: bool = True
    every_s: float = 5.0
    desc: str = "collect"


def collect_signals(
    client: InferClient,
    x: np.ndarray,
    y: np.ndarray,
    member: np.ndarray,
    *,
    repeats: int = 10,
    warmup: int = 20,
    seed: int = 0,
    sample_index: np.ndarray | None = None,
    true_exit_runtime: Runtime | None = None,
    meta: dict[str, Any] | None = None,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
    require: Sequence[str] = (),
    num_exits: int | None = None,
    num_classes: int | None = None,
    on_inconsistent: Literal["warn", "raise"] = "warn",
    checkpoint_every_s: float = 5.0,
    adaptive: Adaptive | None = None,
    retries: int = 3,
    backoff_s: float = 0.05,
    max_lost_fraction: float = 0.2,
) -> Signals:
    """Query ``client`` with every sample of ``x`` ``repeats`` times and return what it revealed.

    ``x``: float model inputs, one row per sample (images scaled to [0, 1]; the protocol takes no
    integer tensors). ``y`` true labels, ``member`` ground-truth membership (stored for evaluation, never sent).
    ``require``: outputs the caller's attack needs (``"probabilities"``, ``"exit_index"``); a deployment
    that does not return one raises :class:`SignalsError` before any timing starts. ``num_exits`` /
    ``num_classes`` default to ``true_exit_runtime``'s, then to what the answers show (probability
    width; highest exposed exit + 1, the paper's Adversary 1 "hyperparameter stealing"); a label-only
    deployment without exposed exits needs ``num_exits`` (the adversary's shadow architecture) or a
    runtime. An unreachable server raises the client's error (a :class:`~mexit.errors.UserError`).

    ``adaptive``: query adaptively (:class:`Adaptive`; ``repeats`` is then ignored) — ``latency_ns`` is
    float64 with NaN where a sample needed fewer queries than others, and ``meta["adaptive"]`` reports the
    mean queries per sample. A query answered with a server error (5xx) or no answer is retried
    ``retries`` times with exponential backoff (from ``backoff_s``); one still failing is lost (its slot
    NaN, counted in ``meta["lost_queries"]``, asked again by a resumed run); more than
    ``max_lost_fraction`` lost stops the collection with one line (the checkpoint keeps what was recorded).
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.int64)
    member = np.asarray(member).astype(bool)
    n = len(x)
    if n == 0:
        raise SignalsError("no samples to query")
    if y.shape != (n,) or member.shape != (n,):
        raise SignalsError(f"x has {n} samples but y has shape {y.shape} and member {member.shape}; give one label "
                           f"and one membership flag per sample")
    sample_index = np.arange(n, dtype=np.int64) if sample_index is None else np.asarray(sample_index, dtype=np.int64)
    if sample_index.shape != (n,):
        raise SignalsError(f"sample_index must have one entry per sample ({n}), got shape {sample_index.shape}")
    _check_arguments(repeats, warmup, on_inconsistent, retries, backoff_s, max_lost_fraction)
    width = adaptive.width if adaptive is not None else repeats
    fingerprint = {"samples": _samples_digest(x, y, member, sample_index), "n": n, "seed": int(seed),
                   "repeats": int(repeats) if adaptive is None else adaptive.fingerprint(),
                   "target": _target_name(client)}
    opts = _Options(require=require, on_inconsistent=on_inconsistent, retries=retries, backoff_s=backoff_s,
                    max_lost_fraction=max_lost_fraction, progress=progress, every_s=checkpoint_every_s)
    state = _open_state(checkpoint_path, fingerprint, n, width)

    def send(i: int) -> Any:
        return client.infer(x[i : i + 1])

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if adaptive is not None:
        _run_adaptive(send, n, state, adaptive, warmup=warmup, seed=seed, checkpoint=ckpt, fingerprint=fingerprint,
                      opts=opts)
    elif state.done() < n * repeats:
        _run_queries(send, n, state, repeats=repeats, warmup=warmup, seed=seed, checkpoint=ckpt,
                     fingerprint=fingerprint, opts=opts)
    else:
        _check_outputs(state.outputs, require)
    sig = _assemble(state, x, y, member, sample_index, true_exit_runtime=true_exit_runtime, meta=meta,
                    repeats=repeats, warmup=warmup, seed=seed, num_exits=num_exits, num_classes=num_classes,
                    target=fingerprint["target"])
    if adaptive is not None:
        cal = adaptive.pace.calibration() if adaptive.calibrating else None  # type: ignore[union-attr]
        sig.meta["adaptive"] = _adaptive_report(state, adaptive, cal)
        sig.meta["repeats"] = None  # a different number per sample: see meta["adaptive"] and the NaN padding
        if cal is not None and sig.latency_ns is not None:
            drift, coupling = target_drift(sig.latency_ns, cal, state.pace_at[:, : sig.latency_ns.shape[1]])
            sig.meta["adaptive"]["drift_coupling"] = coupling.describe()
            if drift is not None:  # the stealers read the drift-corrected timings (drift_corrected_latency_ns)
                sig = replace(sig, latency_drift_ns=drift)
    return sig


def collect_interleaved(
    deployments: Mapping[str, Deployment],
    *,
    repeats: int = 10,
    warmup: int = 20,
    seed: int = 0,
    checkpoint_path: str | Path | None = None,
    progress: bool = True,
    require: Sequence[str] = (),
    on_inconsistent: Literal["warn", "raise"] = "warn",
    checkpoint_every_s: float = 5.0,
    retries: int = 3,
    backoff_s: float = 0.05,
    max_lost_fraction: float = 0.2,
) -> dict[str, Signals]:
    """Query several deployments (e.g. the shadow and the target) in one randomised schedule.

    Every round visits all samples of all deployments in one seeded random order, so the host's speed
    drift (measured between separate recordings on a shared machine) falls on shadow and target alike
    instead of becoming an offset between them. Otherwise as :func:`collect_signals` with fixed repeats;
    returns one :class:`Signals` per deployment name (``meta["interleaved_with"]`` names the others).
    """
    if not deployments:
        raise SignalsError("no deployments to query")
    _check_arguments(repeats, warmup, on_inconsistent, retries, backoff_s, max_lost_fraction)
    names = list(deployments)
    parts = []
    for name in names:
        d = deployments[name]
        xs, ys, ms = np.asarray(d.x), np.asarray(d.y, dtype=np.int64), np.asarray(d.member).astype(bool)
        if not len(xs) or ys.shape != (len(xs),) or ms.shape != (len(xs),):
            raise SignalsError(f"deployment {name!r}: give a non-empty x with one label and one membership flag per "
                               f"sample")
        idx = np.arange(len(xs), dtype=np.int64) if d.sample_index is None else np.asarray(d.sample_index, np.int64)
        parts.append((xs, ys, ms, idx))
    owner = np.concatenate([np.full(len(p[0]), j) for j, p in enumerate(parts)])
    local = np.concatenate([np.arange(len(p[0])) for p in parts])
    n = len(owner)
    fingerprint = {"samples": "|".join(_samples_digest(*p) for p in parts), "n": n, "seed": int(seed),
                   "repeats": int(repeats),
                   "target": "|".join(f"{k}={_target_name(deployments[k].client)}" for k in names)}
    opts = _Options(require=require, on_inconsistent=on_inconsistent, retries=retries, backoff_s=backoff_s,
                    max_lost_fraction=max_lost_fraction, progress=progress, every_s=checkpoint_every_s,
                    desc="collect " + "+".join(names))
    state = _open_state(checkpoint_path, fingerprint, n, repeats)

    def send(i: int) -> Any:
        d, xs = deployments[names[owner[i]]], parts[owner[i]][0]
        return d.client.infer(xs[local[i] : local[i] + 1])

    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if state.done() < n * repeats:
        _run_queries(send, n, state, repeats=repeats, warmup=warmup, seed=seed, checkpoint=ckpt,
                     fingerprint=fingerprint, opts=opts)
    else:
        _check_outputs(state.outputs, require)
    out: dict[str, Signals] = {}
    for j, name in enumerate(names):
        d = deployments[name]
        rows = owner == j
        sub = _Progress(int(rows.sum()), repeats)
        sub.latency, sub.labels, sub.exits = state.latency[rows], state.labels[rows], state.exits[rows]
        sub.probs = None if state.probs is None else state.probs[rows]
        sub.inconsistent, sub.outputs = state.inconsistent[rows], state.outputs
        sub.lost = int((state.attempted[rows] & (state.latency[rows] < 0)).sum())
        meta = {**(d.meta or {}), "interleaved_with": [k for k in names if k != name]}
        out[name] = _assemble(sub, *parts[j], true_exit_runtime=d.true_exit_runtime, meta=meta, repeats=repeats,
                              warmup=warmup, seed=seed, num_exits=d.num_exits, num_classes=d.num_classes,
                              target=_target_name(d.client))
    return out


def _check_arguments(repeats: int, warmup: int, on_inconsistent: str, retries: int, backoff_s: float,
                     max_lost_fraction: float) -> None:
    if repeats < 1 or warmup < 0:
        raise SignalsError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if on_inconsistent not in ("warn", "raise"):
        raise SignalsError(f"on_inconsistent must be 'warn' or 'raise', got {on_inconsistent!r}")
    if retries < 0 or backoff_s < 0 or not 0 <= max_lost_fraction < 1:
        raise SignalsError(f"need retries >= 0, backoff_s >= 0 and max_lost_fraction in [0, 1), got {retries}, "
                           f"{backoff_s} and {max_lost_fraction}")


def _open_state(checkpoint_path: str | Path | None, fingerprint: dict[str, Any], n: int, width: int) -> _Progress:
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = _Progress.load(ckpt, fingerprint)
        logger.info("resuming from %s: %d queries recorded", ckpt, state.done())
        return state
    return _Progress(n, width)


def _check_outputs(outputs: Sequence[str], require: Sequence[str]) -> None:
    for name in (OUT_LABEL, *require):
        if name not in outputs:
            raise SignalsError(f"the target returns {', '.join(outputs) or 'nothing'} but not {name!r}; "
                               f"{_HOW_TO_EXPOSE.get(name, 'this attack cannot run against it')}")


def _send_with_retry(send: Callable[[int], Any], i: int, state: _Progress, opts: _Options) -> Any | None:
    """One query, retried with exponential backoff on a server error (5xx) or no answer; None when lost.

    Before the deployment has answered anything at all, the error is raised: an unreachable or broken
    deployment is a user error, not lost queries.
    """
    for attempt in range(opts.retries + 1):
        if attempt:
            state.retried += 1
            time.sleep(opts.backoff_s * 2 ** (attempt - 1))
        try:
            return send(i)
        except ServerError as exc:
            if exc.status < 500 or not state.outputs:
                raise
            problem: Exception = exc
        except RETRYABLE as exc:
            if not state.outputs:
                raise
            problem = exc
        logger.debug("query of sample %d failed (attempt %d): %s", i, attempt + 1, problem)
    state.lost += 1
    return None


def _warm_up(send: Callable[[int], Any], n: int, state: _Progress, warmup: int, seed: int, opts: _Options) -> None:
    warm_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    for i in warm_rng.integers(0, n, size=warmup):
        res = _send_with_retry(send, int(i), state, opts)
        if res is not None and not state.outputs:
            state.outputs = sorted(res.outputs)
            _check_outputs(state.outputs, opts.require)
    state.lost = 0  # warm-up answers are not recorded, so none of them is lost


def _ask(send: Callable[[int], Any], i: int, r: int, state: _Progress, opts: _Options) -> None:
    """Query sample ``i`` for slot ``r`` and record it (or count it lost); stop when too many are lost."""
    state.attempted[i, r] = True
    res = _send_with_retry(send, i, state, opts)
    if res is not None:
        _record(state, i, r, res.outputs, int(res.rtt_ns), opts.require, opts.on_inconsistent)
        return
    tried = int(state.attempted.sum())
    if tried >= 20 and state.lost > opts.max_lost_fraction * tried:
        raise SignalsError(f"the deployment failed {state.lost} of {tried} queries even after {opts.retries} "
                           f"retries each; check that it is healthy and re-run (the recorded queries are kept when a "
                           f"checkpoint is used)")


class _Saver:
    """Checkpoints the progress at most every ``every_s`` seconds, and once more when the loop ends."""

    def __init__(self, state: _Progress, checkpoint: Path | None, fingerprint: dict[str, Any], every_s: float) -> None:
        self.state, self.checkpoint, self.fingerprint, self.every_s = state, checkpoint, fingerprint, every_s
        self.last = time.monotonic()

    def tick(self) -> None:
        if self.checkpoint is not None and time.monotonic() - self.last >= self.every_s:
            self.state.save(self.checkpoint, self.fingerprint)
            self.last = time.monotonic()

    def close(self) -> None:
        if self.checkpoint is not None and self.state.done():
            self.state.save(self.checkpoint, self.fingerprint)


def _run_queries(send: Callable[[int], Any], n: int, state: _Progress, *, repeats: int, warmup: int, seed: int,
                 checkpoint: Path | None, fingerprint: dict[str, Any], opts: _Options) -> None:
    from tqdm.auto import tqdm

    _warm_up(send, n, state, warmup, seed, opts)
    saver = _Saver(state, checkpoint, fingerprint, opts.every_s)
    bar = tqdm(total=n * repeats, initial=state.done(), disable=not opts.progress, unit="query", desc=opts.desc,
               leave=False)
    try:
        for r in range(repeats):
            todo = _round_order(seed, r, n)
            todo = todo[state.latency[todo, r] < 0]
            for i in todo:
                _ask(send, int(i), r, state, opts)
                bar.update(1)
                saver.tick()
    finally:
        bar.close()
        saver.close()


def _latencies(state: _Progress) -> np.ndarray:
    """Recorded latencies as float64, NaN where no query was recorded."""
    lat = state.latency.astype(np.float64)
    lat[state.latency < 0] = np.nan
    return lat


def first_decision_round(plan: Adaptive, shadow_plan: dict[str, Any] | None) -> int:
    """Rounds every sample gets before the offset is estimated and the sequential test may stop a sample.

    ``min_queries`` at least. When the shadow's replay says samples need many queries (a jittery stack), more:
    half the replay's mean, within half the budget. The offset between shadow and target timings is estimated
    from these first rounds, and with two queries per sample behind a stack adding σ ≈ 0.4 ms it scattered by
    75–95 µs (sd; up to 260 µs, a whole exit gap) on two Location recordings, against 20–30 µs with six.
    """
    first = plan.min_queries
    if shadow_plan is not None:
        want = math.ceil(float(shadow_plan["mean_queries"]) / 2)
        first = max(first, min(want, math.floor(plan.query_budget / 2)))
    return int(min(first, plan.width))


def _run_adaptive(send: Callable[[int], Any], n: int, state: _Progress, plan: Adaptive, *, warmup: int, seed: int,
                  checkpoint: Path | None, fingerprint: dict[str, Any], opts: _Options) -> None:
    """Rounds of queries; after the first rounds (:func:`first_decision_round`) only the samples whose exit is
    still uncertain.

    Which samples a round visits depends only on their own recorded timings, the offset estimated at the start
    of the rounds where it is due (kept in the checkpoint) and, with a calibrating pacer, its answers (kept too), so a
    resumed run makes the same decisions.
    """
    from tqdm.auto import tqdm

    model = replace(plan.model)
    pacer: ShadowPacer | None = plan.pace if plan.calibrating else None  # type: ignore[assignment]
    if pacer is not None:
        if state.loaded_pacer is not None:
            pacer.restore(*state.loaded_pacer)
        state.pacer = pacer  # the checkpoint keeps its answers
    believed = np.full(n, -1, dtype=np.int64)  # the exit each sample is believed to take, refreshed each round
    previous = [-1]
    if plan.pace is not None:
        pace, target_send = plan.pace, send
        mirrored = isinstance(pace, ShadowPacer) and pace.calibrates

        def send(i: int) -> Any:  # the target's query, then one to the shadow: the recording's traffic mix
            try:
                return target_send(i)
            finally:
                if mirrored:  # the exit of the target query before this one (ShadowPacer: mirror one late)
                    pace(int(previous[0]) if previous[0] >= 0 else None)  # type: ignore[call-arg]
                    previous[0] = believed[i]
                else:
                    pace()
    informative = model.informative()
    if not informative:
        logger.warning("the shadow's timings do not separate its exits (constant-time padding?): each target "
                       "sample is queried %d times only, and exits stolen from timing will be at chance",
                       plan.min_queries)
    shadow_plan = _shadow_plan(plan)
    if shadow_plan is not None:
        state.extra["shadow_plan"] = shadow_plan
        logger.info("on the shadow's timings the sequential test stops after %.1f queries per sample on average "
                    "(%.3f balanced accuracy, %d of %d undecided after %d); budget %g per sample",
                    shadow_plan["mean_queries"], shadow_plan["balanced_accuracy"], shadow_plan["undecided"],
                    len(model.reference), shadow_plan["recorded_repeats"], plan.query_budget)
    first = state.extra.setdefault("first_decision_round", first_decision_round(plan, shadow_plan))
    _warm_up(send, n, state, warmup, seed, opts)
    budget = math.floor(plan.query_budget * n)
    bar = tqdm(total=budget, initial=int(state.attempted.sum()), disable=not opts.progress, unit="query",
               desc=opts.desc, leave=False)
    saver = _Saver(state, checkpoint, fingerprint, opts.every_s)

    def ask(i: int, r: int) -> None:
        _ask(send, i, r, state, opts)
        if pacer is not None:
            state.pace_at[i, r] = pacer.last  # type: ignore[attr-defined]
        bar.update(1)
        bar.set_postfix_str(f"{int(state.attempted.sum()) / n:.1f} of {plan.query_budget:g} queries/sample")
        saver.tick()

    try:
        r = 0
        while r < plan.width:
            if r >= first and not informative:
                break
            lat, judge = _latencies(state), replace(model)
            if r >= first and pacer is not None:
                judge, lat = _calibrated(model, pacer.calibration(), state)
            pending = state.extra.get("round")  # a round the run was interrupted in: finish it as planned
            resumed = pending is not None and pending["slot"] == r
            if r >= first and plan.offset:
                if not resumed and not state.attempted[:, r].any() and _offset_due(state, n):
                    _estimate_offset(judge, lat, state)
                model.offset = tuple(state.extra["offset"])  # type: ignore[assignment]
            judge.offset = model.offset
            post = _posterior(judge, lat)  # one posterior a round: the beliefs the pacer mirrors, and the test
            seen = np.isfinite(post[:, 0])
            believed[seen] = np.argmax(post[seen], axis=1)
            if resumed:
                todo, reps = np.asarray(pending["samples"], dtype=np.int64), int(pending["slots"])
            else:
                todo = _round_order(seed, r, n)
                todo = todo[~state.attempted[todo, r]]
                if r >= first:
                    confident = post[todo].max(axis=1) >= plan.confidence  # sequential_stop's rule
                    todo = todo[~confident & state.attempted[todo, r - 1]]  # still uncertain, and asked last round
                if not len(todo):
                    if state.attempted[:, r].any():  # this round was done before the run was resumed
                        r += 1
                        continue
                    break
                reps = 1 if r < first else min(math.ceil(plan.round_queries / len(todo)), plan.width - r)
                state.extra["round"] = {"slot": r, "slots": reps, "samples": todo.tolist()}
            for j in range(reps):  # the round's samples in turn, one slot after the other
                for i in todo:
                    if int(state.attempted.sum()) >= budget and r >= first:
                        return
                    if not state.attempted[i, r + j]:
                        ask(int(i), r + j)
            state.extra.pop("round", None)
            r += reps
        if informative and plan.spend_budget:
            _spend_rest(ask, state, plan, model, pacer, budget)
    finally:
        bar.close()
        saver.close()


def _offset_due(state: _Progress, n: int) -> bool:
    """Whether to estimate the target's offset again: first at the first decision round, then once the target
    has answered one more query per sample on average.

    One estimate, kept for the whole run, went stale: the pacer's calibration moves under it (the level it
    splits between drift and centres changes as its log grows, and the coupling test may switch the drift
    correction on after the first rounds, which moves the judged timings onto the pacer's clock). On two
    200-sample jittery recordings the offset estimated at the first decision round was −51 and −78 µs and
    the one the stealers found on the finished recording +26 and +75 µs; the run's own decisions scored
    0.71 and 0.31 balanced against 0.87 and 0.83 for the stealers (``docs/results.md``). Estimated only at the
    start of a new round, so a resumed run estimates where the uninterrupted one did.
    """
    if "offset" not in state.extra:
        return True
    return int(state.attempted.sum()) - int(state.extra.get("offset_at", 0)) >= n


def _estimate_offset(judge: ExitTimingModel, lat: np.ndarray, state: _Progress) -> None:
    """Estimate the target's offset against ``judge`` (on the statistic it judges) and log it in the state."""
    reduce = "min" if judge.statistic == "min" else "trimmed"
    state.extra["offset"] = list(judge.estimate_offset(lat, reduce=reduce))
    state.extra["offset_at"] = done = int(state.attempted.sum())
    state.extra.setdefault("offsets", []).append([done, *state.extra["offset"]])


def _spend_rest(ask: Callable[[int, int], None], state: _Progress, plan: Adaptive, model: ExitTimingModel,
                pacer: ShadowPacer | None, budget: int) -> None:
    """Every sample was confident before the budget was spent: ask the least certain ones again, at a stricter
    confidence each pass (the error left is ``1 - confidence``; each pass divides it by 4).

    A sample confident at 0.95 is still wrong one time in twenty, and with a few hundred samples the rare
    exits hold one to ten of them, so one error moves their recall by 0.1–1. Each query goes to the sample's
    next free slot, so its repeats stay contiguous.
    """
    level = plan.confidence
    while int(state.attempted.sum()) < budget and level < 1 - 1e-6:
        judge, lat = _calibrated(model, None if pacer is None else pacer.calibration(), state)
        if plan.offset and _offset_due(state, len(lat)):
            _estimate_offset(judge, lat, state)
            model.offset = tuple(state.extra["offset"])  # type: ignore[assignment]
        judge.offset = model.offset
        post = np.nan_to_num(_posterior(judge, lat), nan=0.0)  # a sample never answered: least certain
        slots = state.attempted.sum(axis=1)
        todo = np.flatnonzero((post.max(axis=1) < level) & (slots < plan.width))
        if not len(todo):
            level = 1 - (1 - level) / 4
            continue
        state.extra.setdefault("stricter_confidence", [])
        if not state.extra["stricter_confidence"] or state.extra["stricter_confidence"][-1] != level:
            state.extra["stricter_confidence"].append(level)
        todo = todo[np.argsort(post.max(axis=1)[todo], kind="stable")]  # least certain first
        for _ in range(math.ceil(plan.round_queries / len(todo))):  # few decision steps (Adaptive.round_queries)
            for i in todo[slots[todo] < plan.width]:
                if int(state.attempted.sum()) >= budget:
                    return
                ask(int(i), int(slots[i]))
                slots[i] += 1


def _calibrated(model: ExitTimingModel, cal: PacerCalibration | None, state: _Progress
                ) -> tuple[ExitTimingModel, np.ndarray]:
    """The model with the pacer's per-exit centres blended in, and the target's latencies less the host's drift
    at their moment when the target's own repeats move with that drift (:func:`~mexit.attacks.pacing.
    target_drift`; raw latencies for a target on another host); ``model`` and the raw latencies before the
    pacer has calibrated.

    The centres are used whether or not the drift is: they are the shadow's exits measured under the target's
    current traffic (the pacer mirrors it), from hundreds of answers where the recording had a handful for a
    rare exit. A target that does not move with the pacer's host takes only their gaps (``clock=False``): the
    level of the pacer's centres follows its host, not the target.
    """
    lat = _latencies(state)
    if cal is None:
        return replace(model), lat
    drift = target_drift(lat, cal, state.pace_at)[0]
    if drift is None:  # the gaps between the pacer's centres, on the recording's clock
        return model.recentred(cal.centres, cal.counts, clock=False), lat
    return model.recentred(cal.centres, cal.counts), lat - drift


def _posterior(model: ExitTimingModel, lat: np.ndarray) -> np.ndarray:
    """(n, num_exits) posterior over exits, NaN rows for samples without a recorded query."""
    seen = np.isfinite(lat).any(axis=1)
    post = np.full((len(lat), model.num_exits), np.nan)
    if seen.any():
        post[seen] = model.posterior(lat[seen])
    return post


def _shadow_plan(plan: Adaptive) -> dict[str, Any] | None:
    """The sequential test replayed on the shadow timings the model was fitted on: the queries the target
    will need (optimistic: in-sample), or None for a model without shadow timings."""
    model = plan.model
    exits = model.reference_exits
    if not len(model.reference) or len(exits) != len(model.reference) or model.reference.shape[1] < 2:
        return None
    return replay_sequential(model, model.reference, exits, confidence=plan.confidence,
                             min_queries=plan.min_queries)


def _adaptive_report(state: _Progress, plan: Adaptive, cal: PacerCalibration | None) -> dict[str, Any]:
    """Queries spent per sample and how many samples ended confident, for ``meta["adaptive"]``; ``cal``: the
    pacer's calibration over all its answers (None without a calibrating pacer)."""
    model, lat = _calibrated(plan.model, cal, state)
    if "offset" in state.extra:
        model.offset = tuple(state.extra["offset"])  # type: ignore[assignment]
    ok = np.isfinite(lat).any(axis=1)
    confident = np.zeros(len(lat), dtype=bool)
    if ok.any():
        confident[ok] = sequential_stop(model, lat[ok], plan.confidence)[1]
    counts = state.attempted.sum(axis=1)
    return {"query_budget": plan.query_budget, "confidence": plan.confidence, "min_queries": plan.min_queries,
            "max_per_sample": plan.width, "mean_queries": float(counts.mean()), "max_queries": int(counts.max()),
            "confident_samples": int(confident.sum()), "offset": state.extra.get("offset"),
            "offsets": state.extra.get("offsets", []),
            "shadow_plan": state.extra.get("shadow_plan"),
            "first_decision_round": state.extra.get("first_decision_round"),
            "drift_correction": plan.calibrating,
            "stricter_confidence": state.extra.get("stricter_confidence", []),
            "paced_with_shadow": plan.pace.report(cal) if isinstance(plan.pace, ShadowPacer) else plan.pace is not None,
            "timing_informative": plan.model.informative()}


def _record(state: _Progress, i: int, r: int, outputs: dict[str, np.ndarray], rtt_ns: int,
            require: Sequence[str], on_inconsistent: str) -> None:
    if not state.outputs:
        state.outputs = sorted(outputs)
        _check_outputs(state.outputs, require)
    elif sorted(outputs) != state.outputs:
        raise SignalsError(f"the target changed the outputs it returns mid-collection ({state.outputs} → "
                           f"{sorted(outputs)}); restart the collection against a stable deployment")
    label = int(np.asarray(outputs[OUT_LABEL]).reshape(-1)[0])
    exit_k = int(np.asarray(outputs[OUT_EXIT]).reshape(-1)[0]) if OUT_EXIT in outputs else -1
    probs = np.asarray(outputs[OUT_PROBS], dtype=np.float32).reshape(-1) if OUT_PROBS in outputs else None
    if probs is not None and state.probs is None:
        state.probs = np.full((len(state.labels), len(probs)), np.nan, dtype=np.float32)
    if state.labels[i] < 0:  # first answer for this sample
        state.labels[i], state.exits[i] = label, exit_k
        if probs is not None:
            state.probs[i] = probs  # type: ignore[index]
    else:
        same = label == state.labels[i] and exit_k == state.exits[i]
        if probs is not None:
            same = same and np.allclose(probs, state.probs[i], rtol=1e-5, atol=1e-6)  # type: ignore[index]
        if not same:
            if on_inconsistent == "raise":
                raise SignalsError(f"sample {i} got a different answer on repeat {r + 1} than before; the target is "
                                   f"not deterministic (pass on_inconsistent='warn' to record its first answers)")
            state.inconsistent[i] = True
    state.latency[i, r] = rtt_ns


def _assemble(state: _Progress, x: np.ndarray, y: np.ndarray, member: np.ndarray, sample_index: np.ndarray, *,
              true_exit_runtime: Runtime | None, meta: dict[str, Any] | None, repeats: int, warmup: int, seed: int,
              num_exits: int | None, num_classes: int | None, target: str) -> Signals:
    exposed = OUT_EXIT in state.outputs
    exits = state.exits if exposed else None
    true_exit = None
    extra: dict[str, Any] = {}
    if true_exit_runtime is not None:
        true_exit = np.concatenate([true_exit_runtime.predict(x[s : s + 256]).exit_index
                                    for s in range(0, len(x), 256)]).astype(np.int64)
        if exits is not None:
            mismatched = int((true_exit != exits).sum())
            if mismatched:
                logger.warning("%d of %d exposed exits differ from the runtime's ground truth: is "
                               "true_exit_runtime the served bundle?", mismatched, len(x))
            extra["true_exit_mismatch"] = mismatched
    if num_exits is None:
        if true_exit_runtime is not None:
            num_exits = int(true_exit_runtime.num_exits)
        elif exits is not None:
            num_exits = int(exits.max()) + 1
        else:
            raise SignalsError("the target exposes no exits and no true_exit_runtime was given: pass num_exits= "
                               "(the exit count of the adversary's shadow architecture)")
    if num_classes is None:
        if state.probs is not None:
            num_classes = int(state.probs.shape[1])
        elif true_exit_runtime is not None:
            num_classes = int(true_exit_runtime.num_classes)
        else:
            num_classes = int(max(y.max(), state.labels.max())) + 1
            logger.info("label-only target: assuming %d classes (highest label seen + 1); pass num_classes= to "
                        "override", num_classes)
    unanswered = int((state.labels < 0).sum())
    if unanswered:
        raise SignalsError(f"{unanswered} of {len(x)} samples got no answer at all (every query lost); re-run with the "
                           f"same checkpoint to ask them again")
    latency: np.ndarray = state.latency.copy()
    if (latency < 0).any():  # lost queries, or adaptive querying: NaN marks a repeat not recorded
        latency = _latencies(state)[:, : int(np.flatnonzero(np.isfinite(_latencies(state)).any(axis=0)).max()) + 1]
    lost = int((state.attempted & (state.latency < 0)).sum())
    if lost:
        logger.warning("%d queries were lost to server errors after %d retries in all; their slots are NaN", lost,
                       state.retried)
    informative = _timing_varies(latency)
    if informative is False:
        logger.warning("the target's response times do not vary detectably between samples beyond query noise "
                       "(Kruskal-Wallis p >= 0.01: one exit for all, constant-time padding, or too few repeats): "
                       "exits stolen from its timing may be at chance")
    inconsistent = int(state.inconsistent.sum())
    if inconsistent:
        logger.warning("%d of %d samples got different answers across repeats; their first answers are recorded",
                       inconsistent, len(x))
    info: dict[str, Any] = {
        "target": target,
        "outputs": state.outputs,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "query_protocol": "one sample per request; repeats in rounds, each round in a fresh seeded random order",
        "latency": "client round-trip time per query, perf_counter_ns, column r = round r",
        "inconsistent_samples": inconsistent,
        "lost_queries": lost,
        "retried_queries": state.retried,
        "timing_informative": informative,
        "provenance": provenance(),
        **extra,
    }
    if exposed:
        info["exit_source"] = "exposed"
    info.update(meta or {})
    return Signals(
        member=member,
        true_label=y,
        pred_label=state.labels.copy(),
        sample_index=sample_index,
        num_exits=num_exits,
        num_classes=num_classes,
        probs=None if state.probs is None else state.probs.copy(),
        loss=None if state.probs is None else cross_entropy(state.probs, y),
        exit_index=None if exits is None else exits.copy(),
        true_exit=true_exit,
        latency_ns=latency,
        meta=info,
    )


def _timing_varies(latency: np.ndarray, alpha: float = 0.01) -> bool | None:
    """Whether per-sample timings differ beyond query noise (Kruskal–Wallis across samples); None: untestable.

    False for a constant-time (padded) deployment, or one where every sample takes the same exit.
    """
    lat = np.asarray(latency, dtype=np.float64)
    if lat.ndim != 2 or lat.shape[1] < 2:
        return None
    groups = [row[np.isfinite(row)] for row in lat]
    groups = [g for g in groups if len(g) >= 2]
    if len(groups) < 2 or np.ptp(np.concatenate(groups)) == 0:
        return None if len(groups) < 2 else False
    return bool(stats.kruskal(*groups).pvalue < alpha)

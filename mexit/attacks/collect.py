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

Long collections are resumable: with ``checkpoint_path`` the progress is written atomically every
``checkpoint_every_s`` seconds and when the collection is interrupted; a re-run with the same samples,
seed, repeats and target continues where it stopped (the checkpoint of a finished run is kept, so a
re-run returns at once; delete it once the signals are saved). A checkpoint made with other arguments
is refused with a :class:`SignalsError` naming the difference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from mexit._io import atomic_path, provenance
from mexit.attacks.signals import Signals, SignalsError, cross_entropy
from mexit.runtime.types import Runtime

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
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
    """The per-sample answers and timings collected so far (the checkpoint's content)."""

    def __init__(self, n: int, repeats: int) -> None:
        self.latency = np.full((n, repeats), -1, dtype=np.int64)
        self.labels = np.full(n, -1, dtype=np.int64)
        self.exits = np.full(n, -1, dtype=np.int64)
        self.probs: np.ndarray | None = None
        self.inconsistent = np.zeros(n, dtype=bool)
        self.outputs: list[str] = []

    def done(self) -> int:
        return int((self.latency >= 0).sum())

    def save(self, path: Path, fingerprint: dict[str, Any]) -> None:
        header = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "outputs": self.outputs}
        arrays = {"latency": self.latency, "labels": self.labels, "exits": self.exits,
                  "inconsistent": self.inconsistent}
        if self.probs is not None:
            arrays["probs"] = self.probs
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: Path, fingerprint: dict[str, Any]) -> _Progress:
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {k: data[k] for k in data.files if k != "header"}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
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
        n, repeats = fingerprint["n"], fingerprint["repeats"]
        prog = cls(n, repeats)
        prog.latency, prog.labels, prog.exits = arrays["latency"], arrays["labels"], arrays["exits"]
        prog.inconsistent = arrays["inconsistent"]
        prog.probs = arrays.get("probs")
        prog.outputs = list(header.get("outputs", []))
        return prog


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
    if repeats < 1 or warmup < 0:
        raise SignalsError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if on_inconsistent not in ("warn", "raise"):
        raise SignalsError(f"on_inconsistent must be 'warn' or 'raise', got {on_inconsistent!r}")

    fingerprint = {"samples": _samples_digest(x, y, member, sample_index), "n": n, "seed": int(seed),
                   "repeats": int(repeats), "target": _target_name(client)}
    ckpt = Path(checkpoint_path) if checkpoint_path is not None else None
    if ckpt is not None and ckpt.exists():
        state = _Progress.load(ckpt, fingerprint)
        logger.info("resuming from %s: %d of %d queries done", ckpt, state.done(), n * repeats)
    else:
        state = _Progress(n, repeats)

    if state.done() < n * repeats:
        _run_queries(client, x, state, repeats=repeats, warmup=warmup, seed=seed, require=require,
                     checkpoint=ckpt, fingerprint=fingerprint, progress=progress, on_inconsistent=on_inconsistent,
                     every_s=checkpoint_every_s)
    else:
        _check_outputs(state.outputs, require)
    return _assemble(state, x, y, member, sample_index, true_exit_runtime=true_exit_runtime, meta=meta,
                     repeats=repeats, warmup=warmup, seed=seed, num_exits=num_exits, num_classes=num_classes,
                     target=fingerprint["target"])


def _check_outputs(outputs: Sequence[str], require: Sequence[str]) -> None:
    for name in (OUT_LABEL, *require):
        if name not in outputs:
            raise SignalsError(f"the target returns {', '.join(outputs) or 'nothing'} but not {name!r}; "
                               f"{_HOW_TO_EXPOSE.get(name, 'this attack cannot run against it')}")


def _run_queries(client: InferClient, x: np.ndarray, state: _Progress, *, repeats: int, warmup: int, seed: int,
                 require: Sequence[str], checkpoint: Path | None, fingerprint: dict[str, Any], progress: bool,
                 on_inconsistent: str, every_s: float) -> None:
    from tqdm.auto import tqdm

    n = len(x)
    warm_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    for i in warm_rng.integers(0, n, size=warmup):
        outputs = client.infer(x[i : i + 1]).outputs
        if not state.outputs:
            state.outputs = sorted(outputs)
            _check_outputs(state.outputs, require)
    last_save = time.monotonic()
    bar = tqdm(total=n * repeats, initial=state.done(), disable=not progress, unit="query", desc="collect",
               leave=False)
    try:
        for r in range(repeats):
            todo = _round_order(seed, r, n)
            todo = todo[state.latency[todo, r] < 0]
            for i in todo:
                res = client.infer(x[i : i + 1])
                _record(state, int(i), r, res.outputs, int(res.rtt_ns), require, on_inconsistent)
                bar.update(1)
                if checkpoint is not None and time.monotonic() - last_save >= every_s:
                    state.save(checkpoint, fingerprint)
                    last_save = time.monotonic()
    finally:
        bar.close()
        if checkpoint is not None and state.done():
            state.save(checkpoint, fingerprint)


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
        latency_ns=state.latency.copy(),
        meta=info,
    )

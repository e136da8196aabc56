"""One attack experiment: query a target and its shadow, steal exits, run original and hybrid attacks.

This is what ``mexit attack`` runs (and the audit reuses stage by stage). The auditor knows which
samples are members — the training runs' data splits — and lets the attacker:

1. query the **shadow** deployment with the shadow model's members and non-members (the attacker's
   own model: its exits are known to it) and the **target** deployment with the target's members and
   non-members, one sample per request, ``repeats`` times each (:func:`collect_signals`);
2. steal the target's exits from response times, unsupervised (KDE, the number of exits discovered)
   and supervised (trained on the shadow deployment's timings);
3. fit every attack on shadow signals only and score the target once, for each adversary
   (:mod:`mexit.attacks.suite`);
4. report the metrics with confidence intervals, exit-stealing accuracy, JS divergence of
   member/non-member losses per exit and the members' share per exit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_path, atomic_write_json, provenance
from mexit.attacks.collect import collect_signals
from mexit.attacks.metrics import exit_stealing_metrics, js_divergence_per_exit, member_share_per_exit
from mexit.attacks.mia import ATTACKS
from mexit.attacks.mia.label_only import choose_flip_probability, collect_label_only_scores
from mexit.attacks.signals import Signals
from mexit.attacks.suite import evaluate_adversaries, steal
from mexit.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS_SCHEMA = "mexit.attack/1"


@dataclass
class QuerySet:
    """Samples to query: inputs, labels, membership and their indices in the dataset."""

    x: np.ndarray
    y: np.ndarray
    member: np.ndarray
    index: np.ndarray

    @classmethod
    def from_split(cls, inputs: Any, labels: np.ndarray, members: np.ndarray, non_members: np.ndarray,
                   n: int, seed: int) -> QuerySet:
        """``n`` members and ``n`` non-members drawn (seeded) from the given index sets."""
        rng = np.random.default_rng(seed)
        k = min(n, len(members), len(non_members))
        if k < 10:
            raise ConfigError(f"need at least 10 members and 10 non-members to attack, the split offers {k}")
        idx = np.concatenate([rng.choice(members, k, replace=False), rng.choice(non_members, k, replace=False)])
        return cls(inputs(idx), labels[idx], np.r_[np.ones(k, bool), np.zeros(k, bool)], idx)


@dataclass
class AttackSettings:
    attacks: list[str]
    adversaries: list[int] = field(default_factory=lambda: [1, 2])
    repeats: int = 10
    warmup: int = 20
    seed: int = 0
    bootstrap: int = 1000
    stealer: str = "supervised"
    label_only_kind: str = "tabular"
    label_only_queries: int = 100  # noisy copies per sample (tabular) or HopSkipJump iterations' budget (images)

    @property
    def needs_label_only(self) -> bool:
        return any("label_only_score" in ATTACKS[n].requires for n in self.attacks)


def collect(client: Any, queries: QuerySet, settings: AttackSettings, *, true_exit_runtime: Any, out: Path,
            name: str, num_exits: int | None = None, progress: bool = True) -> Signals:
    """Collect (or resume, or reuse) the signals of one deployment into ``out/signals_<name>.npz``."""
    path = out / f"signals_{name}.npz"
    if path.exists():
        return Signals.load(path)
    signals = collect_signals(client, queries.x, queries.y, queries.member, repeats=settings.repeats,
                              warmup=settings.warmup, seed=settings.seed, sample_index=queries.index,
                              true_exit_runtime=true_exit_runtime, checkpoint_path=out / f".{name}.ckpt.npz",
                              meta={"role": name}, num_exits=num_exits, progress=progress)
    signals.save(path)
    (out / f".{name}.ckpt.npz").unlink(missing_ok=True)
    return signals


def _add_label_only(shadow_client: Any, target_client: Any, sq: QuerySet, tq: QuerySet, shadow: Signals,
                    target: Signals, settings: AttackSettings, out: Path) -> tuple[Signals, Signals, dict[str, Any]]:
    """Label-only robustness scores for both deployments; the flip probability is chosen on the shadow."""
    from dataclasses import replace

    path = out / "label_only_scores.npz"
    if path.exists():
        with np.load(path) as f:
            s_scores, t_scores, info = f["shadow"], f["target"], {"flip_probability": float(f["p"])}
    else:
        opts: dict[str, Any] = {}
        info = {}
        if settings.label_only_kind == "tabular":
            choice = choose_flip_probability(shadow_client, sq.x, sq.y, sq.member, n_noisy=settings.label_only_queries,
                                             seed=settings.seed)
            opts = {"flip_probability": choice.flip_probability, "n_noisy": settings.label_only_queries}
            info = {"flip_probability": choice.flip_probability}
        else:
            opts = {"num_classes": shadow.num_classes}
        s_scores = collect_label_only_scores(shadow_client, sq.x, sq.y, settings.label_only_kind, seed=settings.seed,
                                             **opts)
        t_scores = collect_label_only_scores(target_client, tq.x, tq.y, settings.label_only_kind,
                                             seed=settings.seed + 1, **opts)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, shadow=s_scores, target=t_scores, p=info.get("flip_probability", float("nan")))
    return (replace(shadow, label_only_score=s_scores.astype(np.float32)),
            replace(target, label_only_score=t_scores.astype(np.float32)), info)


def steal_exits(target: Signals, shadow: Signals, *, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Exits stolen from the target's latencies (see :func:`mexit.attacks.suite.steal`), with their accuracy."""
    stolen, kde = steal(target.latency_ns, shadow.latency_ns, shadow.true_exit, target.num_exits, seed)
    report: dict[str, Any] = {"kde": {"discovered_exits": int(kde.n_exits_), **_stealing_score(target, stolen["kde"])}}
    if "supervised" in stolen:
        report["supervised"] = _stealing_score(target, stolen["supervised"])
    return stolen, report


def _stealing_score(target: Signals, pred: np.ndarray) -> dict[str, Any]:
    if target.true_exit is None:
        return {}
    m = exit_stealing_metrics(target.true_exit, pred, target.num_exits)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in m.items()}


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def leakage_summary(signals: Signals) -> dict[str, Any]:
    """Exit distributions of members vs non-members and member/non-member loss JS divergence per exit."""
    if signals.true_exit is None:
        return {}
    share = member_share_per_exit(signals.member, signals.true_exit, signals.num_exits)
    out: dict[str, Any] = {
        "members_per_exit": share["members"].tolist(),
        "nonmembers_per_exit": share["nonmembers"].tolist(),
        "member_share_per_exit": _finite_or_none(share["member_share"]),
    }
    if signals.loss is not None:
        js = js_divergence_per_exit(signals.loss, signals.member, signals.true_exit, signals.num_exits)
        out["loss_js_divergence_per_exit"] = _finite_or_none(js)
    return out


def run_experiment(target_client: Any, shadow_client: Any, target_queries: QuerySet, shadow_queries: QuerySet,
                   settings: AttackSettings, out: Path, *, target_runtime: Any = None, shadow_runtime: Any = None,
                   describe: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Collect, steal, attack and write ``out/results.json``; returns the results."""
    out.mkdir(parents=True, exist_ok=True)
    shadow = collect(shadow_client, shadow_queries, settings, true_exit_runtime=shadow_runtime, out=out,
                     name="shadow", progress=progress)
    target = collect(target_client, target_queries, settings, true_exit_runtime=target_runtime, out=out,
                     name="target", num_exits=shadow.num_exits, progress=progress)
    shadow.check_compatible(target)
    label_only: dict[str, Any] = {}
    if settings.needs_label_only:
        shadow, target, label_only = _add_label_only(shadow_client, target_client, shadow_queries, target_queries,
                                                     shadow, target, settings, out)
    stolen, stealing = steal_exits(target, shadow, seed=settings.seed)
    stealer = settings.stealer if settings.stealer in stolen else "kde"
    adversaries, _ = evaluate_adversaries(settings.attacks, [a for a in settings.adversaries if a in (1, 2)],
                                          target=target, shadow=shadow, shadow3=None, stolen=stolen,
                                          stealer=stealer, seed=settings.seed, bootstrap=settings.bootstrap)
    results = {
        "schema": RESULTS_SCHEMA,
        "setup": describe or {},
        "settings": settings.__dict__,
        "samples": {"target": len(target), "shadow": len(shadow)},
        "exposed": {"probabilities": target.probs is not None, "exit_index": target.exit_index is not None},
        "exit_stealing": stealing,
        "label_only": label_only,
        "leakage": leakage_summary(target),
        "adversaries": adversaries,
        "provenance": provenance(seed=settings.seed),
    }
    atomic_write_json(out / "results.json", results)
    return results

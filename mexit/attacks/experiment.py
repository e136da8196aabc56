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


def _label_only_options(shadow_client: Any, sq: QuerySet, shadow: Signals, settings: AttackSettings
                        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Query options of the label-only signal; the tabular flip probability is chosen on the shadow."""
    if settings.label_only_kind != "tabular":
        return {"num_classes": shadow.num_classes}, {}
    choice = choose_flip_probability(shadow_client, sq.x, sq.y, sq.member, n_noisy=settings.label_only_queries,
                                     seed=settings.seed)
    return ({"flip_probability": choice.flip_probability, "n_noisy": settings.label_only_queries},
            {"flip_probability": choice.flip_probability})


def _add_label_only(shadow_client: Any, target_client: Any, sq: QuerySet, tq: QuerySet, shadow: Signals,
                    target: Signals, settings: AttackSettings, out: Path,
                    shadow3: tuple[Any, QuerySet, Signals] | None = None
                    ) -> tuple[Signals, Signals, Signals | None, dict[str, Any]]:
    """Label-only robustness scores for every deployment; the flip probability is chosen on the shadow.

    Adversary 3's shadow is queried with the same options (the flip probability is a query-design choice
    made once, as in the audit pipeline).
    """
    from dataclasses import replace

    path = out / "label_only_scores.npz"
    if path.exists():
        with np.load(path) as f:
            s_scores, t_scores, p = f["shadow"], f["target"], float(f["p"])
        info: dict[str, Any] = {} if np.isnan(p) else {"flip_probability": p}
        opts: dict[str, Any] = ({"num_classes": shadow.num_classes} if settings.label_only_kind != "tabular" else
                                {"flip_probability": p, "n_noisy": settings.label_only_queries})
    else:
        opts, info = _label_only_options(shadow_client, sq, shadow, settings)
        s_scores = collect_label_only_scores(shadow_client, sq.x, sq.y, settings.label_only_kind, seed=settings.seed,
                                             **opts)
        t_scores = collect_label_only_scores(target_client, tq.x, tq.y, settings.label_only_kind,
                                             seed=settings.seed + 1, **opts)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, shadow=s_scores, target=t_scores, p=info.get("flip_probability", float("nan")))
    s3 = None
    if shadow3 is not None:
        client3, q3, signals3 = shadow3
        path3 = out / "label_only_scores_shadow3.npz"
        if path3.exists():
            with np.load(path3) as f:
                s3_scores = f["shadow3"]
        else:
            s3_scores = collect_label_only_scores(client3, q3.x, q3.y, settings.label_only_kind, seed=settings.seed + 2,
                                                  **opts)
            with atomic_path(path3) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, shadow3=s3_scores)
        s3 = replace(signals3, label_only_score=s3_scores.astype(np.float32))
    return (replace(shadow, label_only_score=s_scores.astype(np.float32)),
            replace(target, label_only_score=t_scores.astype(np.float32)), s3, info)


def steal_exits(target: Signals, shadow: Signals, *, seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Exits stolen from the target's latencies (see :func:`mexit.attacks.suite.steal`), with their accuracy."""
    stolen, fits = steal(target.latency_ns, shadow.latency_ns, shadow.true_exit, target.num_exits, seed)
    report: dict[str, Any] = {
        "kde": {"clusters": int(fits["kde"].n_exits_), "exit_map": fits["kde"].describe()["exit_map"],
                **_stealing_score(target, stolen["kde"])},
        "kde_blind": {"discovered_exits": int(fits["kde-blind"].n_exits_),
                      **_stealing_score(target, stolen["kde-blind"])},
        "supervised": _stealing_score(target, stolen["supervised"]),
    }
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
                   shadow3_client: Any = None, shadow3_queries: QuerySet | None = None, shadow3_runtime: Any = None,
                   describe: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Collect, steal, attack and write ``out/results.json``; returns the results.

    Adversary 3 (in ``settings.adversaries``) needs ``shadow3_client``/``shadow3_queries``/``shadow3_runtime``:
    its own shadow deployment of another architecture and/or trained on other data (same classes).
    """
    if 3 in settings.adversaries and (shadow3_client is None or shadow3_queries is None or shadow3_runtime is None):
        raise ConfigError("adversary 3 needs its own shadow deployment (another architecture or data): pass "
                          "shadow3_client, shadow3_queries and shadow3_runtime")
    out.mkdir(parents=True, exist_ok=True)
    shadow = collect(shadow_client, shadow_queries, settings, true_exit_runtime=shadow_runtime, out=out,
                     name="shadow", progress=progress)
    target = collect(target_client, target_queries, settings, true_exit_runtime=target_runtime, out=out,
                     name="target", num_exits=shadow.num_exits, progress=progress)
    shadow.check_compatible(target)
    shadow3 = None
    if 3 in settings.adversaries:
        assert shadow3_queries is not None
        shadow3 = collect(shadow3_client, shadow3_queries, settings, true_exit_runtime=shadow3_runtime, out=out,
                          name="shadow3", progress=progress)
        # same classes and exit count: the hybrid attacks read exits in the target's index space
        shadow3.check_compatible(target, what="adversary 3's shadow and the target")
    label_only: dict[str, Any] = {}
    if settings.needs_label_only:
        s3_args = None if shadow3 is None else (shadow3_client, shadow3_queries, shadow3)
        shadow, target, shadow3, label_only = _add_label_only(shadow_client, target_client, shadow_queries,
                                                              target_queries, shadow, target, settings, out, s3_args)
    stolen, stealing = steal_exits(target, shadow, seed=settings.seed)
    stealer = settings.stealer if settings.stealer in stolen else "kde"
    adversaries, _ = evaluate_adversaries(settings.attacks, list(settings.adversaries), target=target, shadow=shadow,
                                          shadow3=shadow3, stolen=stolen, stealer=stealer, seed=settings.seed,
                                          bootstrap=settings.bootstrap)
    results = {
        "schema": RESULTS_SCHEMA,
        "setup": describe or {},
        "settings": settings.__dict__,
        "samples": {"target": len(target), "shadow": len(shadow),
                    **({"shadow3": len(shadow3)} if shadow3 is not None else {})},
        "exposed": {"probabilities": target.probs is not None, "exit_index": target.exit_index is not None},
        "exit_stealing": stealing,
        "label_only": label_only,
        "leakage": leakage_summary(target),
        "adversaries": adversaries,
        "provenance": provenance(seed=settings.seed),
    }
    atomic_write_json(out / "results.json", results)
    return results

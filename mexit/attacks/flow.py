"""The attack flow: collect → calibrate → steal exits → attack → leakage, one definition for every caller.

``mexit attack`` runs it end to end (:func:`run_attack_flow`), the audit wraps each step as a cached
stage, and a notebook calls the same functions::

    from mexit.attacks.flow import AttackPlan, QuerySet, collect, steal_exits, evaluate, leakage_summary
    plan = AttackPlan(attacks=["loss", "loss-hybrid"], adversaries=[1, 2])
    shadow = collect(shadow_client, shadow_queries, plan, role="shadow", owner=shadow_runtime)
    target = collect(target_client, target_queries, plan, role="target", owner=target_runtime,
                     calibration=shadow.meta["calibration"])
    stealing = steal_exits(target, shadow, seed=plan.seed)
    adversaries = evaluate(plan, target=target, shadow=shadow, stealing=stealing)

**What is collected follows from the attacks.** Each registered attack declares the :class:`Signals`
fields it reads (``requires``); :func:`signals_needed` is their union. Timing, probabilities, labels and
exposed exits come from the query loop (:func:`~mexit.attacks.collect.collect_signals`); every other
field is produced by its *recorder* in :data:`RECORDERS` (label-only robustness, white-box features).
Adding an attack that needs a new signal is: a field in ``Signals``, the attack's module, and one
recorder registered here.

**The attacker calibrates on its own shadow only.** A recorder may choose a query-design parameter on
the shadow (the label-only flip probability) and returns it as ``calibration``; the target is then
queried with exactly that choice, never tuned on the target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.attacks.adversaries import evaluate_adversaries
from mexit.attacks.collect import collect_signals
from mexit.attacks.metrics import exit_stealing_metrics, member_share_per_exit, per_exit_js
from mexit.attacks.mia import ATTACKS, signals_needed
from mexit.attacks.signals import Signals
from mexit.attacks.stealing import STEALING_VERSION, cross_fit_exits, fit_timing_model, plan_queries
from mexit.attacks.stealing import steal_exits as run_stealers
from mexit.errors import ConfigError, UserError

log = logging.getLogger(__name__)

RESULTS_SCHEMA = "mexit.attack/2"


# ----------------------------------------------------------------------------------------------- queries
@dataclass
class QuerySet:
    """Samples to query: inputs, labels, membership and their indices in the dataset."""

    x: np.ndarray
    y: np.ndarray
    member: np.ndarray
    index: np.ndarray

    @classmethod
    def from_split(cls, inputs: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, members: np.ndarray,
                   non_members: np.ndarray, n_members: int, seed: int, n_nonmembers: int | None = None) -> QuerySet:
        """``n_members`` members and ``n_nonmembers`` (default: as many) non-members, drawn seeded.

        The same rule for ``mexit attack`` and the audit: a seeded draw without replacement from each
        part, so the queried samples do not depend on how the split happens to be ordered.
        """
        n_non = n_members if n_nonmembers is None else n_nonmembers
        km, kn = min(n_members, len(members)), min(n_non, len(non_members))
        if min(km, kn) < 10:
            raise ConfigError(f"need at least 10 members and 10 non-members to attack, the split offers "
                              f"{min(km, kn)}")
        rng = np.random.default_rng(seed)
        idx = np.concatenate([rng.choice(members, km, replace=False), rng.choice(non_members, kn, replace=False)])
        idx = idx.astype(np.int64)
        return cls(inputs(idx), labels[idx], np.r_[np.ones(km, bool), np.zeros(kn, bool)], idx)


def label_only_kind(kind: str, x: np.ndarray) -> str:
    """Random flips for binary tabular rows; decision-boundary distance (HopSkipJump) for anything continuous."""
    if kind == "tabular" and np.isin(x, (0.0, 1.0)).all():
        return "tabular"
    return "image"


# -------------------------------------------------------------------------------------------------- plan
@dataclass
class LabelOnlyOptions:
    """How label-only robustness is measured (:mod:`mexit.attacks.mia.label_only`)."""

    kind: str = "tabular"  # "tabular": random bit flips; "image": HopSkipJump boundary distance
    n_noisy: int = 100  # noisy copies per sample (tabular)
    max_iter: int = 10  # HopSkipJump (image)
    max_eval: int = 100
    init_eval: int = 10
    init_size: int = 20
    clip_values: tuple[float, float] = (0.0, 1.0)


@dataclass
class AttackPlan:
    """What the attacker does: which attacks for which adversaries, and how it queries."""

    attacks: list[str]
    adversaries: list[int] = field(default_factory=lambda: [1, 2])
    repeats: int = 10
    warmup: int = 20
    seed: int = 0
    bootstrap: int = 1000
    stealer: str = "chosen"  # adversary 2's stealer; "chosen": picked by cross-validation on the shadow
    label_only: LabelOnlyOptions = field(default_factory=LabelOnlyOptions)
    #: Adaptive querying of the target: mean queries per sample, spent where the exit is still uncertain
    #: (a sequential test on the timing model fitted on the shadow's fixed-repeat timings). None: fixed repeats.
    query_budget: float | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.attacks) - set(ATTACKS))
        if unknown:
            raise ConfigError(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(sorted(ATTACKS))}")
        bad = sorted(set(self.adversaries) - {1, 2, 3})
        if bad:
            raise ConfigError(f"unknown adversary {bad[0]}; the adversaries are 1 (exit exposed), 2 (exit stolen, "
                              f"same-architecture shadow) and 3 (exit stolen, another shadow)")

    @property
    def signals(self) -> frozenset[str]:
        """The Signals fields the planned attacks read."""
        return signals_needed(self.attacks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- recorders
@dataclass
class RecordContext:
    """What a recorder gets: the deployment, the queried samples, the plan and the shadow's calibration."""

    client: Any
    queries: QuerySet
    plan: AttackPlan
    role: str  # "shadow", "shadow3", "target", or any name for another deployment
    signals: Signals  # what the query loop recorded
    calibration: Mapping[str, Any] | None  # the shadow's choices; None when this deployment is a shadow
    white_box: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None
    progress: bool = True
    #: Reference models for LiRA/RMIA: a trained :class:`~mexit.attacks.reference.ReferenceSet`, or a mapping
    #: role → runtime of single OUT references (the shadow model for the target's samples and vice versa).
    references: Any = None

    @property
    def is_shadow(self) -> bool:
        return self.calibration is None


class Recorder(Protocol):
    def __call__(self, ctx: RecordContext) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Signals fields → arrays, and calibration/info to keep (JSON-able)."""
        ...


def record_label_only(ctx: RecordContext) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Label-only robustness: the tabular flip probability is chosen on the shadow and reused for the others."""
    from mexit.attacks.mia import choose_flip_probability, collect_label_only_scores

    opts, q = ctx.plan.label_only, ctx.queries
    seed = ctx.plan.seed + (1 if ctx.role.endswith("target") else 2 if ctx.role == "shadow3" else 0)
    if opts.kind == "tabular":
        if ctx.is_shadow:
            choice = choose_flip_probability(ctx.client, q.x, q.y, q.member, n_noisy=opts.n_noisy, seed=seed)
            info = {"kind": "flip", "flip_probability": float(choice.flip_probability),
                    "auc_by_probability": {str(k): float(v) for k, v in choice.auc_by_probability.items()}}
            return {"label_only_score": choice.shadow_scores}, info
        p = _calibrated(ctx, "flip_probability")
        scores = collect_label_only_scores(ctx.client, q.x, q.y, "tabular", seed=seed, flip_probability=p,
                                           n_noisy=opts.n_noisy)
        return {"label_only_score": scores}, {"kind": "flip", "flip_probability": p}
    scores = collect_label_only_scores(ctx.client, q.x, q.y, "image", seed=seed,
                                       num_classes=ctx.signals.num_classes, max_iter=opts.max_iter,
                                       max_eval=opts.max_eval, init_eval=opts.init_eval, init_size=opts.init_size,
                                       clip_values=opts.clip_values, progress=ctx.progress)
    return {"label_only_score": scores}, {"kind": "boundary-distance", "clip_values": list(opts.clip_values)}


def _calibrated(ctx: RecordContext, key: str) -> Any:
    if not ctx.calibration or key not in ctx.calibration:
        raise UserError(f"the {ctx.role} deployment needs {key!r} chosen on the shadow first: collect the shadow "
                        f"(role 'shadow') before the {ctx.role} and pass its calibration")
    return ctx.calibration[key]


def record_white_box(ctx: RecordContext) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Embedding and last-layer gradient from the model itself (white-box: the auditor lends the weights)."""
    if ctx.white_box is None:
        raise UserError(f"white-box attacks need the {ctx.role} model's weights: pass its training run")
    wb = ctx.white_box(ctx.queries.x, ctx.queries.y)
    return {"embedding": wb["embedding"], "gradient": wb["gradient"]}, {}


def record_references(ctx: RecordContext) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What the reference models answer on this deployment's queried samples (LiRA/RMIA's signal)."""
    from mexit.attacks.reference import reference_recorder

    if ctx.references is None:
        raise UserError("reference-model attacks (LiRA, RMIA) need reference models: train a reference set "
                        "(audit: attacks.reference_models = N) or pass the shadow and target runtimes as single OUT "
                        "references")
    if isinstance(ctx.references, Mapping) and ctx.role not in ctx.references:
        return {}, {"references": 0}  # no reference model for this deployment: its reference attacks say so
    return reference_recorder(ctx.references)(ctx)


#: Signals field → the recorder that produces it (fields the query loop records are not listed).
RECORDERS: dict[str, Recorder] = {
    "label_only_score": record_label_only,
    "embedding": record_white_box,
    "gradient": record_white_box,
    "reference_score": record_references,
    "reference_in": record_references,
    "reference_exit": record_references,
}


# ---------------------------------------------------------------------------------------------- collect
def collect(client: Any, queries: QuerySet, plan: AttackPlan, *, role: str, owner: Any = None,
            calibration: Mapping[str, Any] | None = None,
            white_box: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None,
            checkpoint_path: Path | None = None, num_exits: int | None = None, num_classes: int | None = None,
            repeats: int | None = None, warmup: int | None = None, meta: Mapping[str, Any] | None = None,
            adaptive: Any = None, references: Any = None, progress: bool = True) -> Signals:
    """Query one deployment and record every signal the plan's attacks need.

    ``owner``: an in-process runtime on the same bundle, used only for the ground-truth exits that score
    exit stealing. ``calibration``: the shadow's choices (``signals.meta["calibration"]`` of the shadow);
    None marks this deployment as a shadow, on which the choices are made. The returned signals carry
    what the recorders chose in ``meta["calibration"]``. ``adaptive``: a
    :class:`~mexit.attacks.collect.Adaptive` plan (see :func:`adaptive_plan`) instead of fixed repeats.
    """
    signals = collect_signals(client, queries.x, queries.y, queries.member,
                              repeats=plan.repeats if repeats is None else repeats,
                              warmup=plan.warmup if warmup is None else warmup, seed=plan.seed,
                              sample_index=queries.index, true_exit_runtime=owner,
                              meta={"role": role, **(meta or {})}, checkpoint_path=checkpoint_path,
                              progress=progress, num_exits=num_exits, num_classes=num_classes, adaptive=adaptive)
    ctx = RecordContext(client=client, queries=queries, plan=plan, role=role, signals=signals,
                        calibration=calibration, white_box=white_box, progress=progress, references=references)
    arrays: dict[str, np.ndarray] = {}
    chosen: dict[str, Any] = {}
    done: set[int] = set()
    for name in sorted(plan.signals & set(RECORDERS)):
        recorder = RECORDERS[name]
        if id(recorder) in done:
            continue
        done.add(id(recorder))
        got, info = recorder(ctx)
        arrays.update({k: np.asarray(v) for k, v in got.items()})
        chosen.update(info)
    if "label_only_score" in arrays:
        arrays["label_only_score"] = arrays["label_only_score"].astype(np.float32)
    return replace(signals, **arrays, meta={**signals.meta, "calibration": chosen})


def collect_cached(path: Path, client: Any, queries: QuerySet, plan: AttackPlan, **kwargs: Any) -> Signals:
    """:func:`collect` into ``path`` (``.npz``), resumable, or the signals already there."""
    if path.exists():
        return Signals.load(path)
    ckpt = path.with_name(f".{path.stem}.ckpt.npz")
    signals = collect(client, queries, plan, checkpoint_path=ckpt, **kwargs)
    signals.save(path)
    ckpt.unlink(missing_ok=True)
    return signals


def _pacer(shadow: Side, plan: AttackPlan, exits: np.ndarray | None = None, num_exits: int = 0
           ) -> Callable[[], None] | None:
    """A shadow pacer for adaptive querying when both deployments are live (``mexit attack``); with the
    shadow's true ``exits`` it also measures the host's drift and the per-exit centres
    (:mod:`mexit.attacks.pacing`)."""
    if plan.query_budget is None:
        return None
    from mexit.attacks.pacing import ShadowPacer

    return ShadowPacer(shadow.client, shadow.queries.x, seed=plan.seed, exits=exits,
                       num_exits=None if exits is None else num_exits)


def adaptive_plan(plan: AttackPlan, shadow: Signals, *, pace: Callable[[], None] | None = None) -> Any:
    """The adaptive query plan for the target, from the shadow's timings (None when ``plan.query_budget`` is None).

    ``pace``: see :class:`~mexit.attacks.collect.Adaptive` (a :class:`~mexit.attacks.collect.ShadowPacer` on the
    live shadow deployment keeps the traffic mix of the shadow's recording)."""
    if plan.query_budget is None:
        return None
    from mexit.attacks.collect import Adaptive

    if shadow.latency_ns is None or shadow.true_exit is None:
        raise UserError("adaptive querying needs the shadow's timings and exits: collect the shadow first")
    # the collector replays the sequential test on the shadow and logs how many queries the target will need
    model = fit_timing_model(shadow.latency_ns, shadow.true_exit, shadow.num_exits, seed=plan.seed)
    return Adaptive(model, query_budget=float(plan.query_budget), pace=pace)


# ----------------------------------------------------------------------------------------------- steal
def chance_accuracy(true_exit: np.ndarray) -> float:
    """Accuracy of always guessing the most common exit: what a stealer must beat."""
    exits = np.asarray(true_exit, dtype=np.int64)
    return float(np.bincount(exits).max() / len(exits)) if len(exits) else float("nan")


def stealing_score(true_exit: np.ndarray, predicted: np.ndarray, num_exits: int) -> dict[str, Any]:
    """One definition of a stealer's result: accuracy next to chance, balanced accuracy next to 1/K, recall."""
    m = exit_stealing_metrics(true_exit, predicted, num_exits)
    used = [r for r in m["per_exit_recall"] if r is not None]
    m["balanced_accuracy"] = float(np.mean(used)) if used else float("nan")
    m["chance"] = chance_accuracy(true_exit)
    m["balanced_chance"] = 1.0 / len(used) if used else float("nan")
    return m


@dataclass
class StealingResult:
    """Exits stolen from the target's response times by every stealer, and how well each did."""

    num_exits: int
    stolen: dict[str, np.ndarray]
    scores: dict[str, dict[str, Any]]  # stealer → stealing_score(...) (empty when the true exits are unknown)
    fits: dict[str, dict[str, Any]]
    query_planning: dict[str, Any]
    chosen: str  # the stealer adversary 2 uses (picked on the shadow's own timings)
    choice: dict[str, Any] = field(default_factory=dict)  # how it was picked: CV scores on the shadow
    shadow_exits: np.ndarray | None = None  # the shadow's exits stolen by `chosen`, cross-fitted

    @property
    def chance(self) -> float | None:
        first = next(iter(self.scores.values()), None)
        return None if first is None else first["chance"]

    def best(self) -> tuple[str, float] | None:
        """The most accurate stealer and its accuracy (None without ground truth)."""
        if not self.scores:
            return None
        name = max(self.scores, key=lambda n: self.scores[n]["accuracy"])
        return name, float(self.scores[name]["accuracy"])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_exits": self.num_exits, "chance": self.chance, "chosen": self.chosen,
                               "choice": self.choice, "stealing_version": STEALING_VERSION,
                               "query_planning": self.query_planning, "stealers": {}}
        for name in self.stolen:
            if name == "chosen":
                continue
            out["stealers"][name] = {**self.scores.get(name, {}), **({"fit": self.fits[name]} if name in self.fits
                                                                     else {})}
        return out

    def save(self, path: Path) -> None:
        """Stolen exits per stealer (and the shadow's cross-fitted ones) as ``.npz``."""
        extra = {} if self.shadow_exits is None else {"shadow_cross_fitted": self.shadow_exits}
        np.savez(path, **{k: v for k, v in self.stolen.items() if k != "chosen"}, **extra)

    @classmethod
    def load(cls, path: Path, *, num_exits: int, chosen: str) -> StealingResult:
        with np.load(path) as z:
            arrays = {n: z[n] for n in z.files}
        shadow_exits = arrays.pop("shadow_cross_fitted", None)
        arrays.pop("true_exit", None)
        return cls(num_exits=num_exits, stolen=arrays, scores={}, fits={}, query_planning={}, chosen=chosen,
                   shadow_exits=shadow_exits)


def steal_exits(target: Signals, shadow: Signals, *, seed: int, stealer: str = "chosen") -> StealingResult:
    """Every stealer on the target's latencies (fitted on the shadow's own timings), scored on the true exits.

    ``stealer``: the one adversary 2 uses; ``"chosen"`` (default) lets the attacker pick by cross-validation
    on its shadow's labelled timings. The shadow's exits are also stolen, cross-fitted with that stealer,
    for fitting adversary 2's hybrid attacks on what they will see.
    """
    if target.latency_ns is None or shadow.latency_ns is None:
        raise UserError("exit stealing needs response times of both deployments; collect them with repeats >= 1")
    if shadow.true_exit is None:
        raise UserError("the shadow's signals hold no exits; collect them with its runtime (owner=...)")
    k = target.num_exits
    centres, counts = paced_centres(target)
    res = run_stealers(target.drift_corrected_latency_ns(), shadow.latency_ns, shadow.true_exit, k, seed,
                       adaptive="adaptive" in target.meta, centres=centres, centre_weights=counts)
    stolen = dict(res.stolen)
    if stealer not in stolen:
        raise ConfigError(f"unknown stealer {stealer!r}; choose one of {', '.join(sorted(stolen))}")
    chosen = res.choice.name if stealer == "chosen" else stealer
    stolen.pop("chosen", None)
    scores = {} if target.true_exit is None else {n: stealing_score(target.true_exit, e, k) for n, e in stolen.items()}
    # the shadow's exits stolen by the same stealer, each fold by one fitted without it (the choice's own CV
    # already made them for its candidates)
    shadow_exits = res.choice.oof.get(chosen)
    if shadow_exits is None:
        shadow_exits = cross_fit_exits(shadow.latency_ns, shadow.true_exit, k, stealer=chosen, seed=seed)
    return StealingResult(num_exits=k, stolen=stolen, scores=scores,
                          fits={n: _fit_json(f) for n, f in res.fits.items()}, query_planning=query_planning(target),
                          chosen=chosen, choice=res.describe(), shadow_exits=shadow_exits)


def paced_centres(target: Signals) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The shadow's per-exit centres (and answers per exit) that the pacer measured while ``target`` was
    queried adaptively (:mod:`mexit.attacks.pacing`), or (None, None) for a recording without them."""
    cal = ((target.meta.get("adaptive") or {}).get("paced_with_shadow") or {})
    cal = cal.get("calibration") if isinstance(cal, dict) else None
    if not cal:
        return None, None
    centres = np.array([np.nan if c is None else float(c) for c in cal["centres_ns"]])
    return centres, np.asarray(cal["answers_per_exit"], dtype=np.float64)


def _fit_json(fit: Any) -> dict[str, Any]:
    d = dict(fit.describe()) if hasattr(fit, "describe") else {}
    for key in ("boundaries", "modes", "centers"):
        if key in d:
            d[f"{key}_ms"] = [float(v) / 1e6 for v in d.pop(key)]
    if "bandwidth" in d:
        bw = d.pop("bandwidth")
        d["bandwidth_ms"] = None if bw is None else float(bw) / 1e6
    if hasattr(fit, "n_exits_"):
        d["clusters"] = int(fit.n_exits_)
    return d


def query_planning(target: Signals) -> dict[str, Any]:
    """The paper's Eq. 1 on this deployment: queries per sample to separate the closest adjacent exits."""
    if target.true_exit is None or target.latency_ns is None:
        return {}
    lat = np.asarray(target.latency_ns, dtype=np.float64) / 1e9
    exits = np.asarray(target.true_exit)
    times = np.array([np.median(lat[exits == e]) if np.any(exits == e) else np.nan
                      for e in range(target.num_exits)])
    noise = float(np.nanmedian(np.nanstd(lat, axis=1))) if lat.shape[1] > 1 else float("nan")
    out: dict[str, Any] = {"clean_times_ms": [None if not np.isfinite(t) else float(t * 1e3) for t in times],
                           "noise_sigma_ms": noise * 1e3 if np.isfinite(noise) else None}
    seen = times[np.isfinite(times)]
    try:
        out["queries_95"] = plan_queries(seen, noise) if np.isfinite(noise) and len(seen) > 1 else None
    except UserError as exc:
        out["queries_95"] = None
        out["note"] = str(exc)
    return out


# ---------------------------------------------------------------------------------------------- attack
def evaluate(plan: AttackPlan, *, target: Signals, shadow: Signals, stealing: StealingResult,
             shadow3: Signals | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every planned attack for every planned adversary, fitted on shadow signals, scored once on the target."""
    if 3 in plan.adversaries and shadow3 is None:
        raise ConfigError("adversary 3 needs the signals of its own shadow deployment (another architecture or "
                          "data)")
    shadow_exits: dict[int, np.ndarray] = {}
    if 2 in plan.adversaries and stealing.shadow_exits is not None:
        shadow_exits[2] = stealing.shadow_exits
    if 3 in plan.adversaries and shadow3 is not None and shadow3.latency_ns is not None:
        # adversary 3 steals with the blind KDE, which needs no labels: its shadow's exits stolen the same way
        from mexit.attacks.stealing import KDEExitStealer, clip_exits

        blind = KDEExitStealer(max_exits=shadow3.num_exits).fit(shadow3.latency_ns)
        shadow_exits[3] = clip_exits(blind.predict(shadow3.latency_ns), shadow3.num_exits)
    return evaluate_adversaries(plan.attacks, list(plan.adversaries), target=target, shadow=shadow, shadow3=shadow3,
                                stolen=stealing.stolen, stealer=stealing.chosen, seed=plan.seed,
                                bootstrap=plan.bootstrap, shadow_exits=shadow_exits)


# --------------------------------------------------------------------------------------------- leakage
def _finite_or_none(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in np.asarray(values, dtype=np.float64)]


def leakage_summary(member: np.ndarray, exits: np.ndarray, num_exits: int,
                    loss: np.ndarray | None = None) -> dict[str, Any]:
    """Exit distributions of members vs non-members and member/non-member loss divergence per exit."""
    share = member_share_per_exit(member, exits, num_exits)
    out: dict[str, Any] = {
        "members_per_exit": share["members"].tolist(),
        "nonmembers_per_exit": share["nonmembers"].tolist(),
        "member_share_per_exit": _finite_or_none(share["member_share"]),
    }
    if loss is not None:
        # each exit's divergence with its sample counts and a shuffled-label baseline (None below a minimum count)
        out["loss_js_divergence_per_exit"] = per_exit_js(loss, member, exits, num_exits)
        out["mean_loss"] = {"members": float(np.mean(loss[member])), "nonmembers": float(np.mean(loss[~member]))}
    return out


# ------------------------------------------------------------------------------------------ end to end
@dataclass
class Side:
    """One deployment the flow queries: its client, the owner's runtime (ground-truth exits) and samples."""

    client: Any
    queries: QuerySet
    owner: Any = None
    white_box: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]] | None = None


def run_attack_flow(target: Side, shadow: Side, plan: AttackPlan, out: Path, *, shadow3: Side | None = None,
                    references: Any = None, describe: dict[str, Any] | None = None, progress: bool = True
                    ) -> dict[str, Any]:
    """Collect (resumable, reused when present), steal, attack and write ``out/results.json``.

    ``references``: reference models for LiRA/RMIA (see :class:`RecordContext`); by default, when the plan
    has reference attacks and both owners' runtimes are at hand, the shadow model is the one OUT reference
    for the target's samples and the target model for the shadow's.
    """
    if 3 in plan.adversaries and shadow3 is None:
        raise ConfigError("adversary 3 needs its own shadow deployment (another architecture or data): pass shadow3")
    out.mkdir(parents=True, exist_ok=True)
    if references is None and plan.signals & {"reference_score"} and shadow.owner is not None \
            and target.owner is not None:
        references = {"target": shadow.owner, "shadow": target.owner}  # single OUT references, no extra training
    s = collect_cached(out / "signals_shadow.npz", shadow.client, shadow.queries, plan, role="shadow",
                       owner=shadow.owner, white_box=shadow.white_box, references=references, progress=progress)
    calibration = s.meta.get("calibration", {})
    t = collect_cached(out / "signals_target.npz", target.client, target.queries, plan, role="target",
                       owner=target.owner, white_box=target.white_box, calibration=calibration,
                       num_exits=s.num_exits, references=references, progress=progress,
                       adaptive=adaptive_plan(plan, s, pace=_pacer(shadow, plan, s.true_exit, s.num_exits)))
    s.check_compatible(t)
    s3 = None
    if 3 in plan.adversaries:
        assert shadow3 is not None
        s3 = collect_cached(out / "signals_shadow3.npz", shadow3.client, shadow3.queries, plan, role="shadow3",
                            owner=shadow3.owner, white_box=shadow3.white_box, calibration=calibration,
                            progress=progress)
        # same classes and exit count: the hybrid attacks read exits in the target's index space
        s3.check_compatible(t, what="adversary 3's shadow and the target")
    results = analyse(plan, target=t, shadow=s, shadow3=s3)
    results.update({"setup": describe or {}, "provenance": provenance(seed=plan.seed)})
    atomic_write_json(out / "results.json", results)
    return results


def analyse(plan: AttackPlan, *, target: Signals, shadow: Signals, shadow3: Signals | None = None) -> dict[str, Any]:
    """Steal, attack and summarise leakage on recorded signals: the part ``mexit attack`` and the audit share."""
    stealing = steal_exits(target, shadow, seed=plan.seed, stealer=plan.stealer)
    adversaries, _ = evaluate(plan, target=target, shadow=shadow, stealing=stealing, shadow3=shadow3)
    leakage = {} if target.true_exit is None else leakage_summary(target.member, target.true_exit,
                                                                  target.num_exits, target.loss)
    return {
        "schema": RESULTS_SCHEMA,
        "plan": plan.to_dict(),
        "samples": {"target": len(target), "shadow": len(shadow),
                    **({"shadow3": len(shadow3)} if shadow3 is not None else {})},
        "exposed": {"probabilities": target.probs is not None, "exit_index": target.exit_index is not None},
        "calibration": shadow.meta.get("calibration", {}),
        "exit_stealing": stealing.to_json(),
        "leakage": leakage,
        "adversaries": adversaries,
    }


def attack_deployments(*, target: str, target_run: Path, shadow: str, shadow_run: Path, out: Path,
                       attacks: list[str], adversaries: list[int], samples: int = 200, repeats: int = 10,
                       query_budget: float | None = None, stealer: str = "chosen",
                       seed: int = 0, label_only_queries: int = 100, threads: int = 1, data_root: Path | None = None,
                       expose: str = "probabilities", expose_exit: bool = False, target_model: str | None = None,
                       shadow_model: str | None = None, target_bundle: Path | None = None,
                       shadow_bundle: Path | None = None, shadow3: str | None = None, shadow3_run: Path | None = None,
                       shadow3_model: str | None = None, shadow3_bundle: Path | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """``mexit attack`` as a function: deployments (bundle directories or OIP URLs) and their training runs in,
    ``out/results.json`` out. The runs say which samples are members (target train) and non-members."""
    from mexit.serve.deploy import connect
    from mexit.train.runner import load_run

    plan = AttackPlan(attacks=attacks, adversaries=adversaries, repeats=repeats, seed=seed, stealer=stealer,
                      query_budget=query_budget)  # validates names
    if 3 in adversaries and (shadow3 is None or shadow3_run is None):
        raise ConfigError("adversary 3 needs its own shadow: pass --shadow3 and --shadow3-run")
    t_run, s_run = load_run(target_run, data_root=data_root), load_run(shadow_run, data_root=data_root)
    if t_run.dataset.num_classes != s_run.dataset.num_classes:
        raise ConfigError("target and shadow runs are on datasets with different classes")
    _check_disjoint(t_run, s_run, "shadow")
    ds = t_run.dataset
    plan.label_only = LabelOnlyOptions(kind=label_only_kind(ds.kind, ds.x), n_noisy=label_only_queries)

    def side(where: str, run: Any, model: str | None, bundle: Path | None, part: str, qseed: int, what: str) -> Side:
        dep = connect(where, model_name=model, bundle=bundle, expose=expose, expose_exit=expose_exit,
                      threads=threads)
        if dep.owner is None and part == "shadow":
            raise ConfigError(f"a URL {what} needs its bundle too (--{what}-bundle): the attacker knows its own "
                              f"shadow's exits")
        members, non = (run.splits.shadow_train, run.splits.shadow_test) if part == "shadow" else \
            (run.splits.target_train, run.splits.target_test)
        q = QuerySet.from_split(run.dataset.inputs, run.dataset.y, members, non, samples, qseed)
        wb = white_box_features(run.model, run.threshold) if "gradient" in plan.signals else None
        return Side(dep.client, q, dep.owner, white_box=wb)

    t_side = side(target, t_run, target_model, target_bundle, "target", seed, "target")
    s_side = side(shadow, s_run, shadow_model, shadow_bundle, "shadow", seed + 1, "shadow")
    s3_side = None
    if 3 in adversaries:
        assert shadow3 is not None and shadow3_run is not None
        s3_run = load_run(shadow3_run, data_root=data_root)
        if s3_run.dataset.num_classes != ds.num_classes:
            raise ConfigError("adversary 3's shadow run is on a dataset with different classes from the target")
        if s3_run.dataset.name == ds.name:
            _check_disjoint(t_run, s3_run, "shadow3")
        s3_side = side(shadow3, s3_run, shadow3_model, shadow3_bundle, "shadow", seed + 2, "shadow3")
    deployed_acc = {"final_exit": t_run.metrics.get("final_exit"),
                    "deployed": deployed_at(t_run.metrics, getattr(t_side.owner, "threshold", None))}
    describe = {"target": target, "shadow": shadow, "target_run": str(target_run), "shadow_run": str(shadow_run),
                "shadow3": shadow3, "shadow3_run": None if shadow3_run is None else str(shadow3_run),
                "arch": t_run.config.arch, "exits": t_run.config.exits, "dataset": t_run.config.dataset,
                "accuracy": deployed_acc}
    return run_attack_flow(t_side, s_side, plan, out, shadow3=s3_side, describe=describe, progress=progress)


def deployed_at(metrics: dict[str, Any], tau: float | None) -> dict[str, Any] | None:
    """The training run's deployed accuracy (members, non-members, exit shares) at the τ actually attacked.

    A bundle may be exported at another τ than the run chose (``mexit export --threshold``); the run's
    ``deployed_curve`` holds every τ of the grid, so the row nearest ``tau`` describes what was attacked.
    Without a known τ (a URL target without its bundle) the run's own choice is returned, as recorded.
    """
    curve = metrics.get("deployed_curve") or []
    if tau is None or not curve:
        return metrics.get("deployed")
    return min(curve, key=lambda row: abs(float(row["tau"]) - float(tau)))


def _check_disjoint(target_run: Any, shadow_run: Any, what: str) -> None:
    """Refuse runs whose target data reach the shadow's training or query data (same dataset only)."""
    from mexit.data.splits import check_disjoint

    if target_run.dataset.name == shadow_run.dataset.name:
        check_disjoint(target_run.splits, shadow_run.splits, what=f"the target and {what} runs")


def white_box_features(model: Any, threshold: float) -> Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]]:
    """The white-box recorder's source: embeddings and last-layer gradients of ``model`` at the deployed
    ``threshold`` (the auditor lends the weights)."""
    from mexit.attacks.whitebox import whitebox_signals

    def features(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        return whitebox_signals(model, x, y, threshold=float(threshold))

    return features

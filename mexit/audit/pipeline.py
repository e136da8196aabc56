"""``run_audit``: the end-to-end audit, one cached stage at a time.

Stages (each a folder ``RUN_DIR/<stage>-<key>/``, see :mod:`mexit.audit.store`)::

    splits-<dataset>      the seeded six-way split; checks there are enough members/non-members to query
    train-<role>          target, shadow, vanilla (1 exit) target [and shadow], Adversary 3's shadow
    export-<role>         verified ONNX bundles, with the deployed threshold
    collect-<role>        deploy (server or in-process), query members and non-members with repeats:
                          signals.npz (what the attacker sees) and owner.npz (the owner's view: exits, losses)
    tau-sweep             leakage and cost vs the early-exit threshold τ, the vanilla model as a line
    steal                 exits stolen from the target's latencies by every stealer; adversary 2's CV choice
    attacks               original and hybrid attacks per adversary (the attack flow); the vanilla baseline
    defenses              every defense (TimeGuard σ grid, [[defenses]]) offline against the strongest adversary
    defense-live          the recommended defense served for real next to a fresh undefended recording

then ``results.json`` (schema :data:`mexit.audit.results.SCHEMA`) and ``report.html``. Roles: ``target`` and ``shadow``
(same architecture, same distribution: adversaries 1 and 2), ``shadow3`` (another architecture or
dataset: adversary 3), ``vanilla-target`` and ``vanilla-shadow`` (1 exit, in-process, no timing).

Servers are started inside ``with`` blocks, so they stop on success, on errors and on Ctrl-C. A run
directory records the schema it was written with (``audit.json``); another schema is refused before
anything is touched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json, provenance
from mexit.attacks.adversaries import evaluate_vanilla, shadow_view
from mexit.attacks.collect import collect_signals
from mexit.attacks.flow import (
    RECORDERS,
    STEALING_VERSION,
    AttackPlan,
    LabelOnlyOptions,
    QuerySet,
    StealingResult,
    adaptive_plan,
    collect,
    evaluate,
    label_only_kind,
    leakage_summary,
    steal_exits,
)
from mexit.attacks.signals import Signals, cross_entropy
from mexit.audit.config import AuditConfig, load_config, make_audit_config
from mexit.audit.results import AUDIT_FILE, RESULTS_FILE, SCHEMA, check_run_dir
from mexit.audit.store import StageResult, StageStore
from mexit.data import Dataset, Splits, load_dataset, make_splits
from mexit.errors import ConfigError, UserError
from mexit.serve.deploy import NamedClient, check_port_free, deployed, owner_runtime

log = logging.getLogger(__name__)

TARGET_KEY_FILE = "timeguard.key"
SHADOW_KEY_FILE = "shadow-timeguard.key"

_TARGET_ROLES = ("target", "vanilla-target")


def _key_id(key: bytes) -> str:
    # A public fingerprint of the key, so that a new key invalidates cached defense results.
    import hashlib

    return hashlib.sha256(b"mexit.audit key id\x00" + bytes(key)).hexdigest()[:12]


class _Audit:
    """State shared by the stages of one run: config, run directory, stage store, datasets, keys."""

    def __init__(self, config: AuditConfig, out_dir: Path, progress: bool) -> None:
        self.cfg = config
        self.out = out_dir
        self.progress = progress
        self._datasets: dict[str, Dataset] = {}
        self._bar: Any = None
        self.store = StageStore(out_dir, on_stage=self._on_stage)

    # -- helpers -------------------------------------------------------------------------------------
    def _on_stage(self, name: str, cached: bool) -> None:
        log.info("%s %s", "reusing" if cached else "running", name)
        if self._bar is not None:
            self._bar.set_description(f"audit: {name}{' (cached)' if cached else ''}")
            self._bar.update(1)

    def dataset(self, name: str) -> Dataset:
        if name not in self._datasets:
            root = self.cfg.dataset.data_root if name == self.cfg.dataset.name else self.cfg.shadow.data_root
            self._datasets[name] = load_dataset(name, root)
        return self._datasets[name]

    def data_root(self, name: str) -> Path | None:
        return self.cfg.dataset.data_root if name == self.cfg.dataset.name else self.cfg.shadow.data_root

    def roles(self) -> dict[str, dict[str, Any]]:
        """Training role → what defines its model (dataset, arch, exits, which half of the split)."""
        cfg = self.cfg
        roles: dict[str, dict[str, Any]] = {
            "target": {"dataset": cfg.dataset.name, "arch": cfg.target.arch, "exits": cfg.target.exits,
                       "role": "target"},
            "shadow": {"dataset": cfg.dataset.name, "arch": cfg.target.arch, "exits": cfg.target.exits,
                       "role": "shadow"},
            "vanilla-target": {"dataset": cfg.dataset.name, "arch": cfg.target.arch, "exits": 1, "role": "target"},
        }
        if cfg.vanilla.attack:
            roles["vanilla-shadow"] = {"dataset": cfg.dataset.name, "arch": cfg.target.arch, "exits": 1,
                                       "role": "shadow"}
        if 3 in cfg.attacks.adversaries:
            roles["shadow3"] = {"dataset": cfg.shadow_dataset, "arch": cfg.shadow_arch, "exits": cfg.target.exits,
                                "role": "shadow"}
        return roles

    def needs_label_only(self) -> bool:
        from mexit.attacks.mia import signals_needed

        return "label_only_score" in signals_needed(self.cfg.attacks.names)

    def keys(self) -> tuple[bytes, bytes]:
        """The target deployment's TimeGuard key (config file or generated per run) and the shadow's."""
        from mexit.defense import load_key, write_key_file

        target_file = self.cfg.timeguard.key_file or self.out / TARGET_KEY_FILE
        shadow_file = self.out / SHADOW_KEY_FILE
        for f in {Path(target_file), shadow_file}:
            if not f.exists():
                write_key_file(f)
        return load_key(target_file), load_key(shadow_file)

    def target_key_file(self) -> Path:
        return Path(self.cfg.timeguard.key_file or self.out / TARGET_KEY_FILE)


# -------------------------------------------------------------------------------------------- stages
def _splits_stage(a: _Audit, dataset_name: str) -> StageResult:
    cfg = a.cfg

    def fn(path: Path) -> dict[str, Any]:
        ds = a.dataset(dataset_name)
        splits = make_splits(ds.y, seed=cfg.seed, max_per_split=cfg.target.limit)
        splits.save(path / "splits.npz")
        return {"dataset": dataset_name, "sizes": splits.sizes(), "seed": cfg.seed}

    res = a.store.run(f"splits-{dataset_name}", {"dataset": dataset_name, "seed": cfg.seed,
                                                 "limit": cfg.target.limit}, fn)
    sizes = res.result["sizes"]
    for part, want, key in (("target_train", cfg.queries.members, "queries.members"),
                            ("target_test", cfg.queries.nonmembers, "queries.nonmembers"),
                            ("shadow_train", cfg.queries.members, "queries.members"),
                            ("shadow_test", cfg.queries.nonmembers, "queries.nonmembers")):
        if want > sizes[part]:
            raise ConfigError(f"invalid config key {key}: {want} samples asked but the {part} part of "
                              f"{dataset_name} holds only {sizes[part]}; lower {key} or raise target.limit")
    return res


def _train_stage(a: _Audit, role: str, spec: dict[str, Any]) -> StageResult:
    from mexit.train.runner import make_config

    t = a.cfg.target
    deps = {**spec, "epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size, "optimizer": t.optimizer,
            "weighting": t.weighting, "limit": t.limit, "tolerance": t.tolerance, "seed": a.cfg.seed,
            "init": "seeded-by-role"}  # target and shadow start from different weights (issue 11)
    train_config = make_config(dataset=spec["dataset"], data_root=a.data_root(spec["dataset"]), arch=spec["arch"],
                               exits=spec["exits"], epochs=t.epochs, lr=t.lr, batch_size=t.batch_size,
                               optimizer=t.optimizer, weighting=t.weighting, seed=a.cfg.seed, role=spec["role"],
                               limit=t.limit, tolerance=t.tolerance, threads=a.cfg.threads)

    def fn(path: Path) -> dict[str, Any]:
        from mexit.train.runner import train_run

        metrics = train_run(train_config, path / "run", progress=a.progress)
        expected = Splits.load(a.store.results[f"splits-{spec['dataset']}"].path / "splits.npz")
        if Splits.load(path / "run" / "splits.npz") != expected:  # pragma: no cover - a change in mexit.train
            raise UserError(f"the {role} training run made other splits than the audit's; delete {path}")
        return {
            "role": role,
            **spec,
            "per_exit": metrics["per_exit"],
            "final_exit": metrics["final_exit"],
            "threshold": metrics["threshold"],  # with its τ curve: every run's choice can be checked
            "deployed": metrics.get("deployed"),
            "split_sizes": metrics["split_sizes"],
            "exit_blocks": metrics.get("exit_blocks"),
            "epochs": len(metrics.get("history", [])),
            "train_seconds": (metrics.get("history") or [{}])[-1].get("seconds"),
        }

    return a.store.run(f"train-{role}", deps, fn, resumable=True)


def _tau_choice(a: _Audit, train: StageResult, vanilla: StageResult | None) -> dict[str, Any]:
    """The τ the paper's rule picks (cheapest τ within tolerance of the vanilla model's validation accuracy).

    Falls back to the run's own final-exit rule for 1-exit models (τ is moot) and when no vanilla model is
    trained for this dataset; the source is recorded either way.
    """
    from mexit.train.threshold import ThresholdSearch, choose_threshold

    search = ThresholdSearch.from_dict(train.result["threshold"])
    if vanilla is None or train.result["exits"] == 1:
        return {"tau": search.tau, "rule": search.rule, "vanilla_accuracy": None,
                "within_tolerance": search.within_tolerance}
    van = float(vanilla.result["final_exit"]["val_accuracy"])
    chosen = choose_threshold(search.curve, rule="vanilla", final_accuracy=float(search.final_accuracy),
                              vanilla_accuracy=van, tolerance=a.cfg.target.tolerance)
    return {"tau": chosen.tau, "rule": "vanilla", "vanilla_accuracy": van, "accuracy": chosen.accuracy,
            "flops_fraction": chosen.flops_fraction, "within_tolerance": chosen.within_tolerance}


def _export_stage(a: _Audit, role: str, train: StageResult, vanilla: StageResult | None) -> StageResult:
    threshold = a.cfg.target.threshold
    rule = _tau_choice(a, train, vanilla)

    def fn(path: Path) -> dict[str, Any]:
        from mexit.export import export_bundle
        from mexit.train.runner import load_run

        run = load_run(train.path / "run", data_root=a.data_root(train.result["dataset"]))
        val = run.splits.shadow_val if run.config.role == "shadow" else run.splits.target_val
        tau = float(threshold) if threshold is not None else float(rule["tau"])
        export_bundle(run.model, path / "bundle", sample_inputs=run.dataset.inputs(val[:64]), threshold=tau,
                      dataset_name=run.dataset.name, dataset_kind=run.dataset.kind,
                      class_names=run.dataset.class_names, exporter=a.cfg.deployment.exporter,
                      save_torch_programs=False, overwrite=True,
                      provenance_extra={"audit_role": role, "train_config": run.config.model_dump(mode="json")})
        return {"role": role, "threshold": tau,
                "threshold_source": "config" if threshold is not None else f"rule:{rule['rule']}",
                "tau_rule": rule, "bundle": "bundle"}

    return a.store.run(f"export-{role}", {"train": train.key, "threshold": threshold, "tau_rule": rule,
                                          "exporter": a.cfg.deployment.exporter}, fn)


def _plan(a: _Audit, ds: Dataset) -> AttackPlan:
    """The attack plan of this audit: the same object ``mexit attack`` builds from its options."""
    cfg = a.cfg
    lo = cfg.attacks.label_only
    lo_kind = label_only_kind(ds.kind, ds.x)
    clip = (0.0, 1.0) if ds.kind == "image" else (float(ds.x.min()), float(ds.x.max()))
    return AttackPlan(attacks=list(cfg.attacks.names), adversaries=list(cfg.attacks.adversaries),
                      repeats=cfg.queries.repeats, warmup=cfg.queries.warmup, seed=cfg.seed,
                      bootstrap=cfg.attacks.bootstrap, stealer=cfg.attacks.stealer,
                      query_budget=cfg.queries.query_budget,
                      label_only=LabelOnlyOptions(kind=lo_kind, n_noisy=lo.n_noisy, max_iter=lo.max_iter,
                                                  max_eval=lo.max_eval, init_eval=lo.init_eval,
                                                  init_size=lo.init_size, clip_values=clip))


def _query_set(a: _Audit, ds: Dataset, splits: Splits, side: str) -> QuerySet:
    """The queried samples of one side: drawn seeded from its members and non-members, as ``mexit attack`` does."""
    members, non = (splits.target_train, splits.target_test) if side == "target" else \
        (splits.shadow_train, splits.shadow_test)
    seed = a.cfg.seed + (0 if side == "target" else 1)
    return QuerySet.from_split(ds.inputs, ds.y, members, non, a.cfg.queries.members, seed,
                               n_nonmembers=a.cfg.queries.nonmembers)


def _backend_deps(cfg: AuditConfig) -> dict[str, Any]:
    """The deployment's backend in a stage key; its options only when some are set (earlier keys still hold)."""
    opts = dict(cfg.deployment.backend_options)
    return {"backend": cfg.deployment.backend, **({"backend_options": opts} if opts else {})}


def _owner(cfg: AuditConfig, bundle: Path) -> Any:
    """The owner's runtime on the deployed backend with its options: the true exits are the deployed ones."""
    return owner_runtime(bundle, backend=cfg.deployment.backend, backend_opts=cfg.deployment.backend_options)


def _collect_stage(a: _Audit, role: str, spec: dict[str, Any], export: StageResult, train: StageResult,
                   *, calibrate_from: StageResult | None = None, references: tuple[str, Any] | None = None
                   ) -> StageResult:
    """Deploy one role, query it through the attack flow, and keep the owner's view beside the signals."""
    cfg = a.cfg
    vanilla = role.startswith("vanilla")
    mode = "in-process" if vanilla else cfg.deployment.mode
    repeats = 1 if vanilla else cfg.queries.repeats
    warmup = 0 if vanilla else cfg.queries.warmup
    ds0 = a.dataset(spec["dataset"])
    plan = _plan(a, ds0)
    recorded = sorted(plan.signals)
    deps = {"export": export.key, "mode": mode, "expose": cfg.deployment.expose, **_backend_deps(cfg),
            "expose_exit": cfg.deployment.expose_exit, "threads": cfg.deployment.threads,
            "members": cfg.queries.members, "nonmembers": cfg.queries.nonmembers, "repeats": repeats,
            "warmup": warmup, "seed": cfg.seed, "signals": recorded, "query_rule": "seeded-draw",
            "query_budget": cfg.queries.query_budget if role == "target" else None,
            "label_only": cfg.attacks.label_only.model_dump() if "label_only_score" in plan.signals else None,
            "calibrate_from": calibrate_from.key if calibrate_from is not None else None,
            "references": None if references is None or "reference_score" not in plan.signals else references[0]}

    def fn(path: Path) -> dict[str, Any]:
        ds = a.dataset(spec["dataset"])
        splits = Splits.load(train.path / "run" / "splits.npz")
        q = _query_set(a, ds, splits, "shadow" if spec["role"] == "shadow" else "target")
        bundle = export.path / "bundle"
        owner = _owner(cfg, bundle)
        calibration, adaptive = None, None
        if calibrate_from is not None:
            shadow_signals = Signals.load(calibrate_from.path / "signals.npz")
            calibration = shadow_signals.meta.get("calibration", {})
            if role == "target":
                adaptive = adaptive_plan(plan, shadow_signals)
        with deployed(bundle, mode=mode, expose=cfg.deployment.expose, expose_exit=cfg.deployment.expose_exit,
                      threads=cfg.deployment.threads, port=cfg.deployment.port,
                      backend=cfg.deployment.backend, backend_opts=cfg.deployment.backend_options) as served:
            client = NamedClient(served, role)
            signals = collect(client, q, plan, role=role, owner=owner, calibration=calibration,
                              white_box=_white_box(a, train, export) if "gradient" in plan.signals else None,
                              checkpoint_path=path / "collect.ckpt.npz", num_exits=owner.num_exits,
                              num_classes=owner.num_classes, repeats=repeats, warmup=warmup,
                              meta={"endpoint": client.endpoint}, adaptive=adaptive,
                              references=None if references is None else references[1](), progress=a.progress)
        signals.save(path / "signals.npz")
        pred = owner.predict(q.x)
        loss = cross_entropy(pred.probs, q.y)
        member = q.member
        np.savez(path / "owner.npz", exit_index=pred.exit_index, loss=loss, labels=pred.labels, member=member,
                 sample_index=q.index)
        (path / "collect.ckpt.npz").unlink(missing_ok=True)
        k = owner.num_exits
        lat = signals.min_latency_ns().astype(np.float64) / 1e6
        return {
            "role": role, "mode": mode, "n": len(signals), "members": int(member.sum()),
            "nonmembers": int((~member).sum()), "repeats": repeats, "num_exits": k,
            "num_classes": owner.num_classes, "signals": recorded,
            "accuracy": float(np.mean(pred.labels == q.y)),
            "member_accuracy": float(np.mean(pred.labels[member] == q.y[member])),
            "nonmember_accuracy": float(np.mean(pred.labels[~member] == q.y[~member])),
            "exit_counts": {"members": np.bincount(pred.exit_index[member], minlength=k).tolist(),
                            "nonmembers": np.bincount(pred.exit_index[~member], minlength=k).tolist()},
            "median_latency_ms": float(np.median(lat)),
            "inconsistent_samples": int(signals.meta.get("inconsistent_samples", 0)),
            "target": signals.meta.get("target"),
            "calibration": signals.meta.get("calibration", {}),
        }

    return a.store.run(f"collect-{role}", deps, fn, resumable=True)


_COUNTERPART = {"target": "shadow", "shadow": "target", "vanilla-target": "vanilla-shadow",
                "vanilla-shadow": "vanilla-target"}


def _reference_stage(a: _Audit, trains: dict[str, StageResult], exports: dict[str, StageResult]
                     ) -> StageResult | None:
    """``attacks.reference_models`` >= 2: reference models of the target's recipe on random halves of a pool of
    the queried samples, trained through the sweep executor (local pool), cached and resumable."""
    from mexit.attacks.mia import signals_needed

    cfg = a.cfg
    n = cfg.attacks.reference_models
    if n < 2 or "reference_score" not in signals_needed(cfg.attacks.names):
        return None
    t = cfg.target
    deps = {"train": trains["target"].key, "export": exports["target"].key, "n": n, "seed": cfg.seed,
            "members": cfg.queries.members, "nonmembers": cfg.queries.nonmembers}

    def fn(path: Path) -> dict[str, Any]:
        from mexit.audit.reference import recipe_of, train_references
        from mexit.train.runner import load_run

        ds = a.dataset(cfg.dataset.name)
        splits = Splits.load(trains["target"].path / "run" / "splits.npz")
        pool = np.concatenate([_query_set(a, ds, splits, side).index for side in ("target", "shadow")])
        run = load_run(trains["target"].path / "run", data_root=cfg.dataset.data_root)
        refs = train_references(dataset=cfg.dataset.name, arch=t.arch, exits=t.exits, pool=pool, n_models=n,
                                out_dir=path / "references", threshold=float(exports["target"].result["threshold"]),
                                recipe=recipe_of(run.config), seed=cfg.seed, data_root=cfg.dataset.data_root,
                                workers=cfg.attacks.reference_workers, threads=cfg.threads or 1,
                                exporter=cfg.deployment.exporter, progress=a.progress)
        return {"models": len(refs), "pool": len(pool), "dir": "references"}

    return a.store.run("references", deps, fn, resumable=True)


def _references_for(a: _Audit, role: str, exports: dict[str, StageResult], refs: StageResult | None
                    ) -> tuple[str, Any] | None:
    """(identity for the cache key, a loader of the reference source) for one collected role, or None."""
    from mexit.attacks.reference import ReferenceSet
    from mexit.runtime import EarlyExitRuntime

    if refs is not None and role in ("target", "shadow"):
        return refs.key, lambda: ReferenceSet.load(refs.path / "references")
    other = _COUNTERPART.get(role)
    if other is None or other not in exports:
        return None
    # single OUT reference: the counterpart model never saw this role's samples (the splits are disjoint)
    return exports[other].key, lambda: {role: EarlyExitRuntime(exports[other].path / "bundle")}


def _white_box(a: _Audit, train: StageResult, export: StageResult) -> Any:
    from mexit.attacks.flow import white_box_features
    from mexit.train.runner import load_run

    run = load_run(train.path / "run", data_root=a.data_root(train.result["dataset"]))
    return white_box_features(run.model, float(export.result["threshold"]))


def _steal_stage(a: _Audit, target: StageResult, shadow: StageResult) -> StageResult:
    def fn(path: Path) -> dict[str, Any]:
        t = Signals.load(target.path / "signals.npz")
        s = Signals.load(shadow.path / "signals.npz")
        result = steal_exits(t, s, seed=a.cfg.seed, stealer=a.cfg.attacks.stealer)
        result.save(path / "stolen.npz")
        return result.to_json()

    return a.store.run("steal", {"target": target.key, "shadow": shadow.key, "seed": a.cfg.seed,
                                 "stealer": a.cfg.attacks.stealer, "stealing": STEALING_VERSION}, fn)


def _attacks_stage(a: _Audit, collects: dict[str, StageResult], steal_res: StageResult) -> StageResult:
    cfg = a.cfg
    deps = {"collect": {r: s.key for r, s in collects.items()}, "steal": steal_res.key,
            "attacks": cfg.attacks.names, "adversaries": cfg.attacks.adversaries, "stealer": cfg.attacks.stealer,
            "bootstrap": cfg.attacks.bootstrap, "seed": cfg.seed}

    def fn(path: Path) -> dict[str, Any]:
        _set_threads(a)
        sig = {r: Signals.load(s.path / "signals.npz") for r, s in collects.items()}
        stealing = StealingResult.load(steal_res.path / "stolen.npz", num_exits=sig["target"].num_exits,
                                       chosen=steal_res.result["chosen"])
        plan = _plan(a, a.dataset(cfg.dataset.name))
        adversaries, scores = evaluate(plan, target=sig["target"], shadow=sig["shadow"], stealing=stealing,
                                       shadow3=sig.get("shadow3"))
        vanilla = None
        if "vanilla-shadow" in sig:
            vanilla = evaluate_vanilla(cfg.attacks.names, target=sig["vanilla-target"], shadow=sig["vanilla-shadow"],
                                       seed=cfg.seed, bootstrap=cfg.attacks.bootstrap)
        np.savez(path / "scores.npz", **{k.replace("/", "__"): v for k, v in scores.items()})
        return {"adversaries": adversaries, "vanilla": vanilla}

    return a.store.run("attacks", deps, fn)


def _tau_sweep_stage(a: _Audit, exports: dict[str, StageResult], collects: dict[str, StageResult]) -> StageResult:
    """Leakage and cost vs τ: both bundles re-deployed in-process at every τ of the grid, exits exposed."""
    from mexit.attacks.tau_sweep import tau_sweep

    cfg = a.cfg
    in_process = {"probs", "loss", "exit_index", "pred_label"}
    from mexit.attacks.mia import ATTACKS

    names = [n for n in cfg.attacks.names if ATTACKS[n].requires <= in_process]
    deps = {"exports": {r: exports[r].key for r in ("target", "shadow", "vanilla-target", "vanilla-shadow")
                        if r in exports},
            "collect": {r: collects[r].key for r in ("target", "shadow")}, "grid": cfg.tau_sweep.grid,
            "attacks": names, "seed": cfg.seed}

    def fn(path: Path) -> dict[str, Any]:
        from mexit.runtime import EarlyExitRuntime

        _set_threads(a)
        ds = a.dataset(cfg.dataset.name)

        def queries(role: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with np.load(collects[role].path / "owner.npz") as z:
                idx, member = z["sample_index"], z["member"].astype(bool)
            return ds.inputs(idx), ds.y[idx], member

        def runtime(role: str) -> Any:
            return lambda tau: EarlyExitRuntime(exports[role].path / "bundle", threshold=tau)

        vanilla = None
        if "vanilla-target" in exports and "vanilla-shadow" in exports:
            vanilla = (EarlyExitRuntime(exports["vanilla-target"].path / "bundle"),
                       EarlyExitRuntime(exports["vanilla-shadow"].path / "bundle"))
        return tau_sweep(runtime("target"), runtime("shadow"), queries("target"), queries("shadow"),
                         grid=cfg.tau_sweep.grid, attacks=names, vanilla=vanilla,
                         deployed_tau=float(exports["target"].result["threshold"]), seed=cfg.seed)

    return a.store.run("tau-sweep", deps, fn)


def _set_threads(a: _Audit) -> None:
    if a.cfg.threads:
        import torch

        torch.set_num_threads(a.cfg.threads)


def _fit_for_defenses(a: _Audit, shadow: Signals, target: Signals, steal_res: StageResult
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Hybrid attacks fitted as adversary 2 fits them (on the shadow's cross-fitted stolen exits), for re-scoring
    under each defense, and the original attacks' membership scores on the target (the gain's reference)."""
    from mexit.attacks.mia import ATTACKS, get_attack

    stealing = StealingResult.load(steal_res.path / "stolen.npz", num_exits=target.num_exits,
                                   chosen=steal_res.result["chosen"])
    sv = shadow_view(shadow, stealing.shadow_exits)
    hybrids: dict[str, Any] = {}
    originals: dict[str, np.ndarray] = {}
    for name in a.cfg.attacks.names:
        try:
            attack = get_attack(name, seed=a.cfg.seed).fit(sv)
            if ATTACKS[name].hybrid:
                hybrids[name] = attack
            else:
                originals[name] = np.asarray(attack.score(target), dtype=np.float64)
        except UserError as exc:
            log.warning("attack %s left out of the defense evaluation: %s", name, exc)
    return hybrids, originals


def _defense_configs(a: _Audit) -> list[Any]:
    """TimeGuard at every σ of the grid, then every ``[[defenses]]`` entry."""
    from mexit.defense.registry import parse_defense

    return [*(parse_defense("timeguard", {"sigma_ms": s}) for s in a.cfg.timeguard.sigma_grid_ms),
            *(d.parsed() for d in a.cfg.defenses)]


def _defenses_stage(a: _Audit, target: StageResult, shadow: StageResult, steal_res: StageResult
                    ) -> tuple[StageResult, dict[str, Any]]:
    from mexit.audit.defense_eval import evaluate_defenses

    cfg = a.cfg
    key, shadow_key = a.keys()
    configs = _defense_configs(a)
    deps = {"target": target.key, "shadow": shadow.key, "steal": steal_res.key,
            "defenses": [c.to_json() for c in configs],
            "rule": cfg.timeguard.model_dump(mode="json", include={"oracle_tolerance", "gain_tolerance"}),
            "attacks": cfg.attacks.names, "stealer": cfg.attacks.stealer, "seed": cfg.seed,
            "key": _key_id(key), "shadow_key": _key_id(shadow_key), "stealing": STEALING_VERSION}
    cache: dict[str, Any] = {}

    def load() -> dict[str, Any]:
        if not cache:
            t = Signals.load(target.path / "signals.npz")
            s = Signals.load(shadow.path / "signals.npz")
            ds = a.dataset(cfg.dataset.name)
            hybrids, originals = _fit_for_defenses(a, s, t, steal_res)
            cache.update(t=t, s=s, x_t=ds.inputs(t.sample_index), x_s=ds.inputs(s.sample_index), kind=ds.kind,
                         hybrids=hybrids, originals=originals)
        return cache

    def fn(path: Path) -> dict[str, Any]:
        _set_threads(a)
        c = load()
        stealer = steal_res.result["chosen"]
        return evaluate_defenses(target=c["t"], shadow=c["s"], x_target=c["x_t"], x_shadow=c["x_s"], kind=c["kind"],
                                 key=key, shadow_key=shadow_key, defenses=configs, hybrid_attacks=c["hybrids"],
                                 original_scores=c["originals"], stealer=stealer, seed=cfg.seed,
                                 gain_tolerance=cfg.timeguard.gain_tolerance,
                                 oracle_tolerance=cfg.timeguard.oracle_tolerance)

    res = a.store.run("defenses", deps, fn)
    return res, {"load": load, "key": key, "shadow_key": shadow_key, "stealer": steal_res.result["chosen"]}


def _live_stage(a: _Audit, dres: StageResult, ctx: dict[str, Any], export: StageResult, target: StageResult
                ) -> StageResult | None:
    """The recommended defense served for real next to a fresh undefended recording, judged again."""
    from mexit.audit.defense_eval import live_defense_confirmation
    from mexit.defense.registry import parse_defense

    cfg = a.cfg
    rec = dres.result.get("recommended")
    if not rec or rec["defense"] == "none":
        log.info("no defense to confirm live: %s", "none needed" if rec else "no defense met the rule")
        return None
    config = parse_defense(rec["defense"], rec["params"])
    deps = {"defenses": dres.key, "export": export.key, "target": target.key, "mode": cfg.deployment.mode,
            "expose": cfg.deployment.expose, "threads": cfg.deployment.threads, **_backend_deps(cfg),
            "defense": config.to_json(), "reference": "fresh-undefended",
            **({} if cfg.timeguard.live_adapt else {"adapt": False})}

    def fn(path: Path) -> dict[str, Any]:
        _set_threads(a)
        c = ctx["load"]()
        base: Signals = c["t"]
        ds = a.dataset(cfg.dataset.name)
        x = ds.inputs(base.sample_index)
        owner = _owner(cfg, export.path / "bundle")

        def record(role: str, guarded: bool) -> Signals:
            """Serve the target (guarded or not) and record it; resumable per role."""
            out_file = path / f"{role}.npz"
            if out_file.exists():
                return Signals.load(out_file)
            with deployed(export.path / "bundle", mode=cfg.deployment.mode, expose=cfg.deployment.expose,
                          expose_exit=False, threads=cfg.deployment.threads, port=cfg.deployment.port,
                          backend=cfg.deployment.backend, backend_opts=cfg.deployment.backend_options,
                          defense=config.name if guarded else None,
                          defense_params=config.params if guarded else None,
                          key_file=a.target_key_file() if guarded else None,
                          adapt=cfg.timeguard.live_adapt) as served:
                sig = collect_signals(NamedClient(served, f"target-{role}"), x, base.true_label, base.member,
                                      repeats=cfg.queries.repeats, warmup=cfg.queries.warmup, seed=cfg.seed,
                                      sample_index=base.sample_index, true_exit_runtime=owner,
                                      meta={"role": f"target-{role}", "defense": config.to_json() if guarded
                                            else None},
                                      checkpoint_path=path / f"{role}.ckpt.npz", progress=a.progress,
                                      num_exits=owner.num_exits, num_classes=owner.num_classes)
            if served.deployment_state is not None:  # what the served guard did: its schedule, refits, overruns
                atomic_write_json(path / f"{role}-state.json", served.deployment_state)
            sig.save(out_file)
            (path / f"{role}.ckpt.npz").unlink(missing_ok=True)
            return sig

        # The cost is measured against a fresh undefended recording made now, under the same machine load,
        # not against the audit's first recording (minutes earlier, possibly under other load).
        reference = record("undefended", False)
        live = record("defended", True)
        # A timing defense changes when answers arrive, not what they are: every recorded signal other than
        # time (label-only robustness, white-box features, reference models' answers) still holds.
        live = replace(live, **{name: getattr(base, name) for name in RECORDERS})
        live.save(path / "signals.npz")
        row = next((r for r in dres.result["rows"] if r["label"] == rec["label"]), None)
        out = live_defense_confirmation(live=live, baseline=reference, shadow=c["s"], x_shadow=c["x_s"],
                                        kind=c["kind"], shadow_key=ctx["shadow_key"], config=config,
                                        stealer=ctx["stealer"], hybrid_attacks=c["hybrids"],
                                        original_scores=c["originals"], offline_row=row, seed=cfg.seed)
        state = path / "defended-state.json"
        out["served_defense"] = json.loads(state.read_text()) if state.exists() else None
        return out

    return a.store.run("defense-live", deps, fn, resumable=True)


# ------------------------------------------------------------------------------------------ results
def _leakage(a: _Audit, collect: StageResult, train: StageResult) -> dict[str, Any]:
    """Owner-side leakage statistics of the target: exits and losses of members vs non-members."""
    with np.load(collect.path / "owner.npz") as z:
        exits, loss, member = z["exit_index"], z["loss"], z["member"].astype(bool)
    k = int(collect.result["num_exits"])
    out = leakage_summary(member, exits, k, loss)
    per_exit = train.result["per_exit"]
    out["mean_flops_fraction"] = float(np.mean([per_exit[e]["flops_fraction"] for e in exits]))
    return out


def _models_section(trains: dict[str, StageResult], exports: dict[str, StageResult],
                    collects: dict[str, StageResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, tr in trains.items():
        entry = {k: tr.result[k] for k in ("dataset", "arch", "exits", "per_exit", "final_exit", "threshold",
                                           "split_sizes", "exit_blocks")}
        entry["deployed_threshold"] = exports[role].result["threshold"] if role in exports else None
        entry["threshold_source"] = exports[role].result.get("threshold_source") if role in exports else None
        entry["tau_rule"] = exports[role].result.get("tau_rule") if role in exports else None
        entry["deployed_validation"] = tr.result.get("deployed")
        if role in collects:
            c = collects[role].result
            entry["deployment"] = {k: c.get(k) for k in ("mode", "accuracy", "member_accuracy", "nonmember_accuracy",
                                                         "exit_counts", "median_latency_ms", "repeats",
                                                         "label_only")}
        out[role] = entry
    return out


def _assemble(a: _Audit, *, trains: dict[str, StageResult], exports: dict[str, StageResult],
              collects: dict[str, StageResult], steal_res: StageResult, attacks: StageResult,
              sweep: StageResult | None,
              tg: StageResult, live: StageResult | None, wall: float) -> dict[str, Any]:
    cfg = a.cfg
    out = a.out
    return {
        "schema": SCHEMA,
        "config": cfg.to_dict(),
        "config_hash": cfg.digest(),
        "seeds": {"seed": cfg.seed, "splits": cfg.seed, "training": cfg.seed, "query_order": cfg.seed,
                  "attacks": cfg.seed, "bootstrap": cfg.seed, "supervised_stealer": cfg.seed},
        "versions": provenance(),
        "models": _models_section(trains, exports, collects),
        "leakage": _leakage(a, collects["target"], trains["target"]),
        "stealing": steal_res.result,
        "adversaries": attacks.result["adversaries"],
        "vanilla": attacks.result["vanilla"],
        "tau_sweep": sweep.result if sweep is not None else None,
        "defenses": tg.result,
        "live": live.result if live is not None else None,
        "timings": {name: {"seconds": r.seconds, "cached": r.cached, "dir": r.path.name}
                    for name, r in a.store.results.items()},
        "wall_seconds": wall,
        "artifacts": {
            "target_signals": str((collects["target"].path / "signals.npz").relative_to(out)),
            "shadow_signals": str((collects["shadow"].path / "signals.npz").relative_to(out)),
            "stolen": str((steal_res.path / "stolen.npz").relative_to(out)),
            "target_owner": str((collects["target"].path / "owner.npz").relative_to(out)),
            "live_signals": str((live.path / "signals.npz").relative_to(out)) if live is not None else None,
            "target_bundle": str((exports["target"].path / "bundle").relative_to(out)),
        },
    }


# ----------------------------------------------------------------------------------------------- API
def _as_config(config: AuditConfig | Mapping[str, Any] | str | Path | None) -> AuditConfig:
    if isinstance(config, AuditConfig):
        return config
    if config is None or isinstance(config, str | Path):
        return load_config(config)
    return make_audit_config(config)


def _check_environment(a: _Audit) -> None:
    """Fail before any work for problems the user can fix now: data, optional packages, a busy port."""
    a.dataset(a.cfg.dataset.name)
    if 3 in a.cfg.attacks.adversaries:
        a.dataset(a.cfg.shadow_dataset)
    ds = a.dataset(a.cfg.dataset.name)
    if a.needs_label_only() and label_only_kind(ds.kind, ds.x) == "image":
        try:
            import art  # noqa: F401
        except ImportError:
            raise ConfigError("invalid config key attacks.names: label-only attacks on continuous inputs measure "
                              "decision-boundary distances with IBM ART: pip install adversarial-robustness-toolbox, "
                              "or leave the label-only attacks out") from None
    if a.cfg.deployment.mode == "server":
        check_port_free(a.cfg.deployment.port)


def run_audit(config: AuditConfig | Mapping[str, Any] | str | Path | None, out_dir: str | Path, *,
              progress: bool = True, report: bool = True) -> dict[str, Any]:
    """Run (or resume) the audit described by ``config`` in ``out_dir`` and return its results.

    ``config``: an :class:`AuditConfig`, a config document, a TOML/YAML path, or None for the built-in
    default. Writes ``results.json`` and (``report=True``) ``report.html`` into ``out_dir``; every stage
    is cached there, so a re-run (or a run restarted after an interruption) only does what is missing.
    """
    cfg = _as_config(config)
    out = Path(out_dir)
    check_run_dir(out)
    a = _Audit(cfg, out, progress)
    _check_environment(a)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / AUDIT_FILE, {"schema": SCHEMA, "config": cfg.to_dict(), "config_hash": cfg.digest(),
                                         "provenance": provenance()})
    start = time.perf_counter()
    roles = a.roles()
    transfer_split = 3 in cfg.attacks.adversaries and cfg.shadow.data != "same-distribution"
    n_stages = 1 + len(roles) * 3 + 4 + int(cfg.tau_sweep.enabled) + int(transfer_split)
    from tqdm.auto import tqdm

    a._bar = tqdm(total=n_stages, desc="audit", unit="stage", disable=not progress, leave=False)
    try:
        _splits_stage(a, cfg.dataset.name)
        if cfg.shadow_dataset != cfg.dataset.name and 3 in cfg.attacks.adversaries:
            _splits_stage(a, cfg.shadow_dataset)
        trains = {role: _train_stage(a, role, spec) for role, spec in roles.items()}
        # the paper's τ rule: each multi-exit model against its own side's vanilla model (the target's when the
        # adversary trains none); adversary 3's shadow on other data has no vanilla and keeps its own rule
        vanilla_of = {"target": trains.get("vanilla-target"),
                      "shadow": trains.get("vanilla-shadow") or trains.get("vanilla-target"),
                      "shadow3": None}
        exports = {role: _export_stage(a, role, trains[role], vanilla_of.get(role)) for role in roles}
        refs = _reference_stage(a, trains, exports)
        collects: dict[str, StageResult] = {}
        for role in ("shadow", "target", "shadow3", "vanilla-shadow", "vanilla-target"):
            if role not in roles or (role == "vanilla-target" and not cfg.vanilla.attack):
                continue  # the vanilla baseline is only queried when it is attacked
            calibrate_from = None  # the attacker's choices are made on its own shadow, then reused
            if role in _TARGET_ROLES or role == "shadow3":
                calibrate_from = collects.get("vanilla-shadow" if role == "vanilla-target" else "shadow")
            collects[role] = _collect_stage(a, role, roles[role], exports[role], trains[role],
                                            calibrate_from=calibrate_from, references=_references_for(a, role, exports,
                                                                                                    refs))
        sweep = _tau_sweep_stage(a, exports, collects) if cfg.tau_sweep.enabled else None
        steal_res = _steal_stage(a, collects["target"], collects["shadow"])
        attacks = _attacks_stage(a, collects, steal_res)
        tg, tg_ctx = _defenses_stage(a, collects["target"], collects["shadow"], steal_res)
        live = None
        if cfg.timeguard.confirm_live:
            live = _live_stage(a, tg, tg_ctx, exports["target"], collects["target"])
    finally:
        a._bar.close()
    results = _assemble(a, trains=trains, exports=exports, collects=collects, steal_res=steal_res, attacks=attacks,
                        sweep=sweep, tg=tg, live=live, wall=time.perf_counter() - start)
    atomic_write_json(out / RESULTS_FILE, results)
    if report:
        from mexit.audit.report import build_report

        build_report(out)
    log.info("audit finished in %.1f s: %s", results["wall_seconds"], out / RESULTS_FILE)
    return results

"""``run_audit``: the end-to-end audit, one cached stage at a time.

Stages (each a folder ``RUN_DIR/<stage>-<key>/``, see :mod:`mexit.audit.store`)::

    splits-<dataset>      the seeded six-way split; checks there are enough members/non-members to query
    train-<role>          target, shadow, vanilla (1 exit) target [and shadow], Adversary 3's shadow
    export-<role>         verified ONNX bundles, with the deployed threshold
    collect-<role>        deploy (server or in-process), query members and non-members with repeats:
                          signals.npz (what the attacker sees) and owner.npz (the owner's view: exits, losses)
    steal                 exits stolen from the target's latencies: KDE and shadow-trained supervised
    attacks               original and hybrid attacks per adversary; the vanilla baseline
    timeguard             TimeGuard over the σ grid and constant-time padding, offline; the recommended σ
    timeguard-live        the recommended σ served for real next to a fresh undefended recording, exits stolen again

then ``results.json`` (schema ``mexit.audit/1``) and ``report.html``. Roles: ``target`` and ``shadow``
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
from mexit.attacks.collect import collect_signals
from mexit.attacks.metrics import exit_stealing_metrics, js_divergence_per_exit, member_share_per_exit
from mexit.attacks.signals import Signals, cross_entropy
from mexit.attacks.suite import (
    STEALING_VERSION,
    evaluate_adversaries,
    evaluate_vanilla,
    run_attack,
    shadow_view,
    steal,
)
from mexit.audit.config import AuditConfig, load_config, make_audit_config
from mexit.audit.defense_eval import (
    chance_accuracy,
    clean_times,
    latencies_s,
    live_confirmation,
    timeguard_frontier,
)
from mexit.audit.deploy import NamedClient, check_port_free, deployed
from mexit.audit.store import StageResult, StageStore
from mexit.data import Dataset, Splits, load_dataset, make_splits
from mexit.errors import ConfigError, UserError

log = logging.getLogger(__name__)

SCHEMA = "mexit.audit/1"
AUDIT_FILE = "audit.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
TARGET_KEY_FILE = "timeguard.key"
SHADOW_KEY_FILE = "shadow-timeguard.key"

_TARGET_ROLES = ("target", "vanilla-target")


# ------------------------------------------------------------------------------------- run directory
def check_run_dir(out_dir: Path) -> None:
    """Refuse a directory that is not an audit run of this schema (before anything is written)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; choose a directory for --out")
    marker = out_dir / AUDIT_FILE
    if not marker.exists():
        if any(out_dir.iterdir()):
            raise UserError(f"{out_dir} exists and is not a mexit audit directory; choose another --out")
        return
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{marker} is unreadable; choose another --out or delete {out_dir}") from None
    if record.get("schema") != SCHEMA:
        raise UserError(f"{out_dir} was written by an incompatible mexit (schema {record.get('schema')!r}, this "
                        f"is {SCHEMA!r}); choose another --out, or delete it to start over")


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
        from mexit.attacks.mia import ATTACKS

        return any("label_only_score" in ATTACKS[n].requires for n in self.cfg.attacks.names)

    def needs_white_box(self) -> bool:
        from mexit.attacks.mia import ATTACKS

        return any("gradient" in ATTACKS[n].requires for n in self.cfg.attacks.names)

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
            "weighting": t.weighting, "limit": t.limit, "tolerance": t.tolerance, "seed": a.cfg.seed}
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
            "threshold": {k: v for k, v in metrics["threshold"].items() if k != "curve"},
            "split_sizes": metrics["split_sizes"],
            "exit_blocks": metrics.get("exit_blocks"),
            "epochs": len(metrics.get("history", [])),
            "train_seconds": (metrics.get("history") or [{}])[-1].get("seconds"),
        }

    return a.store.run(f"train-{role}", deps, fn, resumable=True)


def _export_stage(a: _Audit, role: str, train: StageResult) -> StageResult:
    threshold = a.cfg.target.threshold

    def fn(path: Path) -> dict[str, Any]:
        from mexit.export import export_bundle
        from mexit.train.runner import load_run

        run = load_run(train.path / "run", data_root=a.data_root(train.result["dataset"]))
        val = run.splits.shadow_val if run.config.role == "shadow" else run.splits.target_val
        tau = float(threshold) if threshold is not None else run.threshold
        export_bundle(run.model, path / "bundle", sample_inputs=run.dataset.inputs(val[:64]), threshold=tau,
                      dataset_name=run.dataset.name, dataset_kind=run.dataset.kind,
                      class_names=run.dataset.class_names, exporter=a.cfg.deployment.exporter,
                      save_torch_programs=False, overwrite=True,
                      provenance_extra={"audit_role": role, "train_config": run.config.model_dump(mode="json")})
        return {"role": role, "threshold": tau, "threshold_source": "config" if threshold is not None else "search",
                "bundle": "bundle"}

    return a.store.run(f"export-{role}", {"train": train.key, "threshold": threshold,
                                          "exporter": a.cfg.deployment.exporter}, fn)


def _label_only_kind(ds: Dataset) -> str:
    """Random flips for binary tabular rows; decision-boundary distance (HopSkipJump) for anything continuous."""
    if ds.kind == "tabular" and np.isin(ds.x, (0.0, 1.0)).all():
        return "tabular"
    return "image"


def _query_set(a: _Audit, ds: Dataset, splits: Splits, side: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices, labels and membership of the queried samples: the first members/non-members of a split side."""
    train_part, test_part = (splits.target_train, splits.target_test) if side == "target" else \
        (splits.shadow_train, splits.shadow_test)
    idx = np.concatenate([train_part[: a.cfg.queries.members], test_part[: a.cfg.queries.nonmembers]])
    member = np.r_[np.ones(a.cfg.queries.members, bool), np.zeros(a.cfg.queries.nonmembers, bool)]
    return idx.astype(np.int64), ds.y[idx], member


def _collect_stage(a: _Audit, role: str, spec: dict[str, Any], export: StageResult, train: StageResult,
                   *, flip_from: StageResult | None = None) -> StageResult:
    cfg = a.cfg
    vanilla = role.startswith("vanilla")
    mode = "in-process" if vanilla else cfg.deployment.mode
    repeats = 1 if vanilla else cfg.queries.repeats
    warmup = 0 if vanilla else cfg.queries.warmup
    label_only = a.needs_label_only()
    white_box = a.needs_white_box()
    deps = {"export": export.key, "mode": mode, "expose": cfg.deployment.expose,
            "expose_exit": cfg.deployment.expose_exit, "threads": cfg.deployment.threads,
            "members": cfg.queries.members, "nonmembers": cfg.queries.nonmembers, "repeats": repeats,
            "warmup": warmup, "seed": cfg.seed, "white_box": white_box,
            "label_only": cfg.attacks.label_only.model_dump() if label_only else None,
            "flip_from": flip_from.key if (label_only and flip_from is not None) else None}

    def fn(path: Path) -> dict[str, Any]:
        from mexit.runtime import EarlyExitRuntime

        ds = a.dataset(spec["dataset"])
        splits = Splits.load(train.path / "run" / "splits.npz")
        idx, y, member = _query_set(a, ds, splits, "shadow" if spec["role"] == "shadow" else "target")
        x = ds.inputs(idx)
        bundle = export.path / "bundle"
        owner = EarlyExitRuntime(bundle)
        extra: dict[str, Any] = {}
        with deployed(bundle, mode=mode, expose=cfg.deployment.expose, expose_exit=cfg.deployment.expose_exit,
                      threads=cfg.deployment.threads, port=cfg.deployment.port) as served:
            client = NamedClient(served, role)
            signals = collect_signals(client, x, y, member, repeats=repeats, warmup=warmup, seed=cfg.seed,
                                      sample_index=idx, true_exit_runtime=owner,
                                      meta={"role": role, "endpoint": client.endpoint},
                                      checkpoint_path=path / "collect.ckpt.npz", progress=a.progress,
                                      num_exits=owner.num_exits, num_classes=owner.num_classes)
            if label_only:
                scores, extra = _label_only_scores(a, client, ds, x, y, member, role, flip_from, owner.num_classes)
                signals = replace(signals, label_only_score=scores)
        if white_box:
            signals = _add_white_box(a, signals, train, export, x, y)
        signals.save(path / "signals.npz")
        pred = owner.predict(x)
        loss = cross_entropy(pred.probs, y)
        np.savez(path / "owner.npz", exit_index=pred.exit_index, loss=loss, labels=pred.labels, member=member,
                 sample_index=idx)
        (path / "collect.ckpt.npz").unlink(missing_ok=True)
        k = owner.num_exits
        lat = signals.min_latency_ns().astype(np.float64) / 1e6
        return {
            "role": role, "mode": mode, "n": len(signals), "members": int(member.sum()),
            "nonmembers": int((~member).sum()), "repeats": repeats, "num_exits": k,
            "num_classes": owner.num_classes,
            "accuracy": float(np.mean(pred.labels == y)),
            "member_accuracy": float(np.mean(pred.labels[member] == y[member])),
            "nonmember_accuracy": float(np.mean(pred.labels[~member] == y[~member])),
            "exit_counts": {"members": np.bincount(pred.exit_index[member], minlength=k).tolist(),
                            "nonmembers": np.bincount(pred.exit_index[~member], minlength=k).tolist()},
            "median_latency_ms": float(np.median(lat)),
            "inconsistent_samples": int(signals.meta.get("inconsistent_samples", 0)),
            "target": signals.meta.get("target"),
            **extra,
        }

    return a.store.run(f"collect-{role}", deps, fn, resumable=True)


def _label_only_scores(a: _Audit, client: Any, ds: Dataset, x: np.ndarray, y: np.ndarray, member: np.ndarray,
                       role: str, flip_from: StageResult | None, num_classes: int) -> tuple[np.ndarray, dict]:
    from mexit.attacks.mia import choose_flip_probability, collect_label_only_scores

    opts = a.cfg.attacks.label_only
    kind = _label_only_kind(ds)
    if kind == "tabular":
        if flip_from is None:  # a shadow: the adversary picks the flip probability on it
            choice = choose_flip_probability(client, x, y, member, n_noisy=opts.n_noisy, seed=a.cfg.seed)
            return choice.shadow_scores, {"label_only": {"kind": "flip", "flip_probability": choice.flip_probability,
                                                         "auc_by_probability": {str(k): v for k, v in
                                                                                choice.auc_by_probability.items()}}}
        p = float(flip_from.result["label_only"]["flip_probability"])
        scores = collect_label_only_scores(client, x, y, "tabular", seed=a.cfg.seed, flip_probability=p,
                                           n_noisy=opts.n_noisy)
        return scores, {"label_only": {"kind": "flip", "flip_probability": p}}
    lo, hi = (0.0, 1.0) if ds.kind == "image" else (float(ds.x.min()), float(ds.x.max()))
    scores = collect_label_only_scores(client, x, y, "image", seed=a.cfg.seed, num_classes=num_classes,
                                       max_iter=opts.max_iter, max_eval=opts.max_eval, init_eval=opts.init_eval,
                                       init_size=opts.init_size, clip_values=(lo, hi), progress=a.progress)
    return scores, {"label_only": {"kind": "boundary-distance", "clip_values": [lo, hi]}}


def _add_white_box(a: _Audit, signals: Signals, train: StageResult, export: StageResult, x: np.ndarray,
                   y: np.ndarray) -> Signals:
    from mexit.attacks.whitebox import whitebox_signals
    from mexit.train.runner import load_run

    run = load_run(train.path / "run", data_root=a.data_root(train.result["dataset"]))
    wb = whitebox_signals(run.model, x, y, threshold=float(export.result["threshold"]))
    return replace(signals, embedding=wb["embedding"], gradient=wb["gradient"])


def _steal_stage(a: _Audit, target: StageResult, shadow: StageResult) -> StageResult:
    def fn(path: Path) -> dict[str, Any]:
        t = Signals.load(target.path / "signals.npz")
        s = Signals.load(shadow.path / "signals.npz")
        assert t.true_exit is not None and s.true_exit is not None and t.latency_ns is not None
        k = t.num_exits
        stolen, fits = steal(t.latency_ns, s.latency_ns, s.true_exit, k, a.cfg.seed)
        np.savez(path / "stolen.npz", **stolen, true_exit=t.true_exit)
        return {
            "num_exits": k,
            "chance": chance_accuracy(t.true_exit),
            "kde": {**exit_stealing_metrics(t.true_exit, stolen["kde"], k), "fit": _kde_json(fits["kde"])},
            "kde_blind": {**exit_stealing_metrics(t.true_exit, stolen["kde-blind"], k),
                          "fit": _kde_json(fits["kde-blind"])},
            "supervised": exit_stealing_metrics(t.true_exit, stolen["supervised"], k),
            "query_planning": _query_planning(t),
        }

    return a.store.run("steal", {"target": target.key, "shadow": shadow.key, "seed": a.cfg.seed,
                                 "stealing": STEALING_VERSION}, fn)


def _kde_json(kde: Any) -> dict[str, Any]:
    d = kde.describe()
    d["boundaries_ms"] = [b / 1e6 for b in d.pop("boundaries")]
    d["modes_ms"] = [m / 1e6 for m in d.pop("modes")]
    d["centers_ms"] = [c / 1e6 for c in d.pop("centers")]
    d["bandwidth_ms"] = d.pop("bandwidth") / 1e6 if d.get("bandwidth") is not None else None
    return d


def _query_planning(t: Signals) -> dict[str, Any]:
    """The paper's Eq. 1 on this deployment: queries per sample to separate the closest adjacent exits."""
    from mexit.attacks.stealing import plan_queries

    assert t.true_exit is not None
    lat = latencies_s(t)
    times = clean_times(lat, t.true_exit, t.num_exits)
    noise = float(np.median(lat.std(axis=1))) if lat.shape[1] > 1 else float("nan")
    out: dict[str, Any] = {"clean_times_ms": (times * 1e3).tolist(), "noise_sigma_ms": noise * 1e3}
    try:
        out["queries_95"] = plan_queries(times, noise) if np.isfinite(noise) else None
    except UserError as exc:
        out["queries_95"] = None
        out["note"] = str(exc)
    return out


def _attacks_stage(a: _Audit, collects: dict[str, StageResult], steal_res: StageResult) -> StageResult:
    cfg = a.cfg
    deps = {"collect": {r: s.key for r, s in collects.items()}, "steal": steal_res.key,
            "attacks": cfg.attacks.names, "adversaries": cfg.attacks.adversaries, "stealer": cfg.attacks.stealer,
            "bootstrap": cfg.attacks.bootstrap, "seed": cfg.seed}

    def fn(path: Path) -> dict[str, Any]:
        _set_threads(a)
        sig = {r: Signals.load(s.path / "signals.npz") for r, s in collects.items()}
        with np.load(steal_res.path / "stolen.npz") as z:
            stolen = {name: z[name] for name in z.files if name != "true_exit"}
        adversaries, scores = evaluate_adversaries(
            cfg.attacks.names, cfg.attacks.adversaries, target=sig["target"], shadow=sig["shadow"],
            shadow3=sig.get("shadow3"), stolen=stolen, stealer=cfg.attacks.stealer, seed=cfg.seed,
            bootstrap=cfg.attacks.bootstrap)
        vanilla = None
        if "vanilla-shadow" in sig:
            vanilla = evaluate_vanilla(cfg.attacks.names, target=sig["vanilla-target"], shadow=sig["vanilla-shadow"],
                                       seed=cfg.seed, bootstrap=cfg.attacks.bootstrap)
        np.savez(path / "scores.npz", **{k.replace("/", "__"): v for k, v in scores.items()})
        return {"adversaries": adversaries, "vanilla": vanilla}

    return a.store.run("attacks", deps, fn)


def _set_threads(a: _Audit) -> None:
    if a.cfg.threads:
        import torch

        torch.set_num_threads(a.cfg.threads)


def _fit_hybrid(a: _Audit, shadow: Signals, target: Signals) -> tuple[dict[str, Any], float | None]:
    """Hybrid attacks fitted on the shadow (for re-scoring under a defense), and the best original balanced accuracy."""
    from mexit.attacks.mia import ATTACKS, get_attack

    sv = shadow_view(shadow)
    hybrids: dict[str, Any] = {}
    best_original: float | None = None
    for name in a.cfg.attacks.names:
        try:
            if ATTACKS[name].hybrid:
                hybrids[name] = get_attack(name, seed=a.cfg.seed).fit(sv)
            else:
                m, _, _ = run_attack(name, sv, target, seed=a.cfg.seed, bootstrap=0)
                if "error" not in m:
                    ba = float(m["balanced_accuracy"]["value"])
                    best_original = ba if best_original is None else max(best_original, ba)
        except UserError as exc:
            log.warning("attack %s left out of the TimeGuard evaluation: %s", name, exc)
    return hybrids, best_original


def _timeguard_stage(a: _Audit, target: StageResult, shadow: StageResult) -> tuple[StageResult, dict[str, Any]]:
    cfg = a.cfg
    key, shadow_key = a.keys()
    deps = {"target": target.key, "shadow": shadow.key, "timeguard": cfg.timeguard.model_dump(
        mode="json", include={"sigma_grid_ms", "stealing_tolerance", "attack_tolerance"}),
        "attacks": cfg.attacks.names, "stealer": cfg.attacks.stealer, "seed": cfg.seed,
        "key": _key_id(key), "shadow_key": _key_id(shadow_key), "stealing": STEALING_VERSION}
    cache: dict[str, Any] = {}

    def load() -> dict[str, Any]:
        if not cache:
            t = Signals.load(target.path / "signals.npz")
            s = Signals.load(shadow.path / "signals.npz")
            ds = a.dataset(cfg.dataset.name)
            hybrids, best_original = _fit_hybrid(a, s, t)
            cache.update(t=t, s=s, x_t=ds.inputs(t.sample_index), x_s=ds.inputs(s.sample_index), kind=ds.kind,
                         hybrids=hybrids, best_original=best_original)
        return cache

    def fn(path: Path) -> dict[str, Any]:
        _set_threads(a)
        c = load()
        return timeguard_frontier(target=c["t"], shadow=c["s"], x_target=c["x_t"], x_shadow=c["x_s"], kind=c["kind"],
                                  key=key, shadow_key=shadow_key, sigmas_ms=cfg.timeguard.sigma_grid_ms,
                                  stealer=cfg.attacks.stealer, hybrid_attacks=c["hybrids"],
                                  best_original_balanced_accuracy=c["best_original"],
                                  stealing_tolerance=cfg.timeguard.stealing_tolerance,
                                  attack_tolerance=cfg.timeguard.attack_tolerance, seed=cfg.seed)

    res = a.store.run("timeguard", deps, fn)
    return res, {"load": load, "key": key, "shadow_key": shadow_key}


def _live_stage(a: _Audit, tg: StageResult, tg_ctx: dict[str, Any], export: StageResult, target: StageResult,
                train: StageResult) -> StageResult:
    cfg = a.cfg
    sigma = float(tg.result["recommended"]["sigma_ms"])
    deps = {"timeguard": tg.key, "export": export.key, "target": target.key, "mode": cfg.deployment.mode,
            "expose": cfg.deployment.expose, "threads": cfg.deployment.threads, "sigma_ms": sigma,
            "reference": "fresh-undefended"}

    def fn(path: Path) -> dict[str, Any]:
        from mexit.runtime import EarlyExitRuntime

        _set_threads(a)
        c = tg_ctx["load"]()
        base: Signals = c["t"]
        ds = a.dataset(cfg.dataset.name)
        x = ds.inputs(base.sample_index)
        owner = EarlyExitRuntime(export.path / "bundle")

        def record(role: str, sigma_ms: float | None) -> Signals:
            """Serve the target (guarded when ``sigma_ms``) and record it; resumable per role."""
            out_file = path / f"{role}.npz"
            if out_file.exists():
                return Signals.load(out_file)
            with deployed(export.path / "bundle", mode=cfg.deployment.mode, expose=cfg.deployment.expose,
                          expose_exit=False, threads=cfg.deployment.threads, port=cfg.deployment.port,
                          sigma_ms=sigma_ms, key_file=a.target_key_file() if sigma_ms else None) as served:
                sig = collect_signals(NamedClient(served, f"target-{role}"), x, base.true_label, base.member,
                                      repeats=cfg.queries.repeats, warmup=cfg.queries.warmup, seed=cfg.seed,
                                      sample_index=base.sample_index, true_exit_runtime=owner,
                                      meta={"role": f"target-{role}", "sigma_ms": sigma_ms},
                                      checkpoint_path=path / f"{role}.ckpt.npz", progress=a.progress,
                                      num_exits=owner.num_exits, num_classes=owner.num_classes)
            sig.save(out_file)
            (path / f"{role}.ckpt.npz").unlink(missing_ok=True)
            return sig

        # The cost is measured against a fresh undefended recording made now, under the same machine load,
        # not against the audit's first recording (minutes earlier, possibly under other load).
        reference = record("undefended", None)
        live = record("timeguard", sigma)
        # TimeGuard changes when answers arrive, not what they are: label-only robustness and white-box
        # features measured on the undefended deployment still hold.
        live = replace(live, label_only_score=base.label_only_score, embedding=base.embedding, gradient=base.gradient)
        live.save(path / "signals.npz")
        return live_confirmation(live=live, baseline=reference, shadow=c["s"], x_shadow=c["x_s"], kind=c["kind"],
                                 shadow_key=tg_ctx["shadow_key"], sigma_ms=sigma, stealer=cfg.attacks.stealer,
                                 hybrid_attacks=c["hybrids"], offline_row=tg.result["recommended"]["row"],
                                 seed=cfg.seed)

    return a.store.run("timeguard-live", deps, fn, resumable=True)


# ------------------------------------------------------------------------------------------ results
def _leakage(a: _Audit, collect: StageResult, train: StageResult) -> dict[str, Any]:
    """Owner-side leakage statistics of the target: exits and losses of members vs non-members."""
    with np.load(collect.path / "owner.npz") as z:
        exits, loss, member = z["exit_index"], z["loss"], z["member"].astype(bool)
    k = int(collect.result["num_exits"])
    share = member_share_per_exit(member, exits, k)
    js = js_divergence_per_exit(loss, member, exits, k)
    per_exit = train.result["per_exit"]
    return {
        "exit_distribution": {"members": share["members"].tolist(), "nonmembers": share["nonmembers"].tolist(),
                              "member_share": [None if np.isnan(v) else float(v) for v in share["member_share"]]},
        "loss_js_divergence": [None if np.isnan(v) else float(v) for v in js],
        "mean_loss": {"members": float(loss[member].mean()), "nonmembers": float(loss[~member].mean())},
        "mean_flops_fraction": float(np.mean([per_exit[e]["flops_fraction"] for e in exits])),
    }


def _models_section(trains: dict[str, StageResult], exports: dict[str, StageResult],
                    collects: dict[str, StageResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, tr in trains.items():
        entry = {k: tr.result[k] for k in ("dataset", "arch", "exits", "per_exit", "final_exit", "threshold",
                                           "split_sizes", "exit_blocks")}
        entry["deployed_threshold"] = exports[role].result["threshold"] if role in exports else None
        entry["threshold_source"] = exports[role].result.get("threshold_source") if role in exports else None
        if role in collects:
            c = collects[role].result
            entry["deployment"] = {k: c.get(k) for k in ("mode", "accuracy", "member_accuracy", "nonmember_accuracy",
                                                         "exit_counts", "median_latency_ms", "repeats",
                                                         "label_only")}
        out[role] = entry
    return out


def _assemble(a: _Audit, *, trains: dict[str, StageResult], exports: dict[str, StageResult],
              collects: dict[str, StageResult], steal_res: StageResult, attacks: StageResult,
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
        "timeguard": tg.result,
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
    if a.needs_label_only() and _label_only_kind(a.dataset(a.cfg.dataset.name)) == "image":
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
    n_stages = 1 + len(roles) * 3 + 4 + (1 if 3 in cfg.attacks.adversaries and cfg.shadow.data != "same-distribution"
                                         else 0)
    from tqdm.auto import tqdm

    a._bar = tqdm(total=n_stages, desc="audit", unit="stage", disable=not progress, leave=False)
    try:
        _splits_stage(a, cfg.dataset.name)
        if cfg.shadow_dataset != cfg.dataset.name and 3 in cfg.attacks.adversaries:
            _splits_stage(a, cfg.shadow_dataset)
        trains = {role: _train_stage(a, role, spec) for role, spec in roles.items()}
        exports = {role: _export_stage(a, role, trains[role]) for role in roles}
        collects: dict[str, StageResult] = {}
        for role in ("shadow", "target", "shadow3", "vanilla-shadow", "vanilla-target"):
            if role not in roles or (role == "vanilla-target" and not cfg.vanilla.attack):
                continue  # the vanilla baseline is only queried when it is attacked
            flip_from = None
            if role in _TARGET_ROLES:
                flip_from = collects.get("shadow" if role == "target" else "vanilla-shadow")
            collects[role] = _collect_stage(a, role, roles[role], exports[role], trains[role], flip_from=flip_from)
        steal_res = _steal_stage(a, collects["target"], collects["shadow"])
        attacks = _attacks_stage(a, collects, steal_res)
        tg, tg_ctx = _timeguard_stage(a, collects["target"], collects["shadow"])
        live = None
        if cfg.timeguard.confirm_live:
            live = _live_stage(a, tg, tg_ctx, exports["target"], collects["target"], trains["target"])
    finally:
        a._bar.close()
    results = _assemble(a, trains=trains, exports=exports, collects=collects, steal_res=steal_res, attacks=attacks,
                        tg=tg, live=live, wall=time.perf_counter() - start)
    atomic_write_json(out / RESULTS_FILE, results)
    if report:
        from mexit.audit.report import build_report

        build_report(out)
    log.info("audit finished in %.1f s: %s", results["wall_seconds"], out / RESULTS_FILE)
    return results


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """``results.json`` of an audit run directory, schema-checked."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        hint = "re-run `mexit audit` with the same --out to finish it" if (run_dir / AUDIT_FILE).exists() else \
            "pass the --out directory of a finished `mexit audit`"
        raise UserError(f"{run_dir} holds no {RESULTS_FILE}; {hint}")
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} is unreadable; re-run `mexit audit` with the same --out to rewrite it") from None
    if not isinstance(results, dict) or results.get("schema") != SCHEMA:
        got = results.get("schema") if isinstance(results, dict) else None
        raise UserError(f"{path} was written by an incompatible mexit (schema {got!r}, this reads {SCHEMA!r}); "
                        f"re-run the audit into a new --out")
    return results

"""LiRA and RMIA with reference models on Location (FCN-18-1, 6 exits) vs the shadow-model attacks.

Protocol (the paper's splits, seed 0): the target trains on ``target_train`` (members) and is queried on
``target_train`` and ``target_test`` (non-members, >= 1,000); the shadow model trains on ``shadow_train``
and supplies the shadow-model attacks (score/loss/confidence and their hybrids, fitted on the shadow's own
members and non-members). ``--models`` reference models of the same architecture, exits, recipe and exit
threshold train on random halves of the pool ``target_train + target_test + shadow_test`` (so each query
sample is IN for half of them; the halves are larger than the target's training set by 1.5x, the price of
the RMIA population ``shadow_test`` being non-members of the target that are IN for some references).
Every model is exported to a bundle and queried through the early-exit runtime, so exits are real.

Reference attacks are fitted on a *paired* reference (:func:`mexit.attacks.reference.paired_shadow`:
reference 0 as a shadow of known membership); RMIA's population is the target queried on ``shadow_test``.
The single-reference rows use the shadow model alone as the one OUT reference of every target sample (the
default audit's free version; fitted with the target as the shadow samples' reference).

Adversary 1 sees the true exits; adversary 2 steals them from response times (batch-1 queries, ``--repeats``
each, the supervised stealer trained on the shadow deployment's timings; the references' own exits are
known to their owner). Every number has a bootstrap interval; TPR at 0.1 % / 1 % FPR comes with
Clopper–Pearson intervals where measurable; the comparisons (best reference attack vs best shadow-model
attack; exit-aware vs oblivious) are paired bootstraps on the same target samples.

    python benchmarks/lira_rmia_location.py --data-root ../shared/data/location [--models 16] [--epochs 20]
        [--threshold 0.9] [--workers 2] [--work runs/lira_location] [--out benchmarks/results/lira_rmia_location.json]

Training is resumable and cached in ``--work`` (re-running skips finished models).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from mexit._io import atomic_write_json, provenance

RESULTS = Path(__file__).resolve().parent / "results"
CLASSIC = ("score", "loss", "confidence")
REFERENCE = ("lira-offline", "lira-online", "rmia-offline", "rmia-online")
log = logging.getLogger("lira_rmia_location")


def train_role(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and export the target or the shadow (a task for the process pool)."""
    from mexit.export import export_bundle
    from mexit.train.runner import load_run, make_config, train_run

    t0 = time.perf_counter()
    cfg = make_config(dataset="location", data_root=spec["data_root"], arch="fcn18-1", exits=spec["exits"],
                      epochs=spec["epochs"], seed=spec["seed"], role=spec["role"], threads=1)
    run_dir = Path(spec["work"]) / spec["role"]
    train_run(cfg, run_dir / "run", progress=False)
    bundle = run_dir / "bundle"
    if not (bundle / "manifest.json").exists():
        run = load_run(run_dir / "run", data_root=spec["data_root"])
        val = run.splits.shadow_val if spec["role"] == "shadow" else run.splits.target_val
        export_bundle(run.model, bundle, sample_inputs=run.dataset.inputs(val[:64]), threshold=spec["threshold"],
                      dataset_name="location", dataset_kind="tabular", exporter="legacy", save_torch_programs=False,
                      overwrite=True)
    return {"status": "ok", "role": spec["role"], "seconds": time.perf_counter() - t0}


def query(bundle: Path, x: np.ndarray, repeats: int) -> dict[str, np.ndarray]:
    """Probabilities and exits (one batch), and ``repeats`` batch-1 latencies per sample (for stealing)."""
    from mexit.runtime import EarlyExitRuntime

    rt = EarlyExitRuntime(bundle)
    pred = rt.predict(x)
    lat = np.empty((len(x), repeats), dtype=np.int64)
    for _ in range(20):  # warm-up
        rt.predict(x[:1])
    for r in range(repeats):
        for i in range(len(x)):
            lat[i, r] = rt.predict(x[i:i + 1]).latency_ns[0]
    return {"probs": pred.probs, "exits": pred.exit_index, "latency": lat}


def make_signals(q: dict[str, np.ndarray], y: np.ndarray, idx: np.ndarray, member: np.ndarray, exits: np.ndarray,
                 refs: dict[str, np.ndarray] | None, num_exits: int) -> Any:
    from mexit.attacks.signals import Signals, cross_entropy

    return Signals(member=member, true_label=y, pred_label=q["probs"].argmax(axis=1), sample_index=idx,
                   num_exits=num_exits, num_classes=q["probs"].shape[1], probs=q["probs"],
                   loss=cross_entropy(q["probs"], y), exit_index=exits, true_exit=q["exits"],
                   latency_ns=q["latency"], **(refs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default="../shared/data/location")
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--exits", type=int, default=6)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("runs/lira_location"))
    ap.add_argument("--out", type=Path, default=RESULTS / "lira_rmia_location.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "mexit.export", "mexit.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from mexit.attacks.metrics import attack_metrics, low_fpr_tpr, paired_bootstrap, significance_statement
    from mexit.attacks.mia import get_attack
    from mexit.attacks.reference import paired_shadow, reference_signals, single_reference
    from mexit.attacks.stealing import SupervisedExitStealer
    from mexit.audit.executors import map_tasks
    from mexit.audit.reference import train_references
    from mexit.data import load_dataset, make_splits

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    work = args.work.resolve()
    ds = load_dataset("location", args.data_root)
    sp = make_splits(ds.y, seed=args.seed)
    common = {"data_root": str(Path(args.data_root).resolve()), "exits": args.exits, "epochs": args.epochs,
              "seed": args.seed, "threshold": args.threshold, "work": str(work)}
    t0 = time.perf_counter()
    rows = map_tasks(train_role, [({**common, "role": r},) for r in ("target", "shadow")], workers=args.workers)
    if any(r.get("status") != "ok" for r in rows):
        raise SystemExit(f"target/shadow training failed: {rows}")
    roles_s = time.perf_counter() - t0
    pool = np.concatenate([sp.target_train, sp.target_test, sp.shadow_test])
    t0 = time.perf_counter()
    refs = train_references(dataset="location", data_root=args.data_root, arch="fcn18-1", exits=args.exits,
                            pool=pool, n_models=args.models, out_dir=work / f"references-m{args.models}",
                            threshold=args.threshold,
                            recipe={"epochs": args.epochs, "lr": 1e-3, "batch_size": 128, "optimizer": "adam",
                                    "weighting": "sum"}, seed=args.seed, workers=args.workers, threads=1,
                            exporter="legacy")
    refs_s = time.perf_counter() - t0
    log.info("trained: roles %.0f s, %d references %.0f s", roles_s, len(refs), refs_s)

    # ---- queries
    t0 = time.perf_counter()
    q_idx = np.concatenate([sp.target_train, sp.target_test])
    member = np.r_[np.ones(len(sp.target_train), bool), np.zeros(len(sp.target_test), bool)]
    s_idx = np.concatenate([sp.shadow_train, sp.shadow_test])
    s_member = np.r_[np.ones(len(sp.shadow_train), bool), np.zeros(len(sp.shadow_test), bool)]
    z_idx = np.asarray(sp.shadow_test)
    tb, sb = work / "target" / "bundle", work / "shadow" / "bundle"
    tq = query(tb, ds.inputs(q_idx), args.repeats)
    tz = query(tb, ds.inputs(z_idx), args.repeats)
    sq = query(sb, ds.inputs(s_idx), args.repeats)
    shadow_on_target = query(sb, ds.inputs(q_idx), 1)
    target_on_shadow = query(tb, ds.inputs(s_idx), 1)
    ref_q = reference_signals(refs, ds.inputs(q_idx), ds.y[q_idx], q_idx)
    ref_z = reference_signals(refs, ds.inputs(z_idx), ds.y[z_idx], z_idx)
    query_s = time.perf_counter() - t0

    stealer = SupervisedExitStealer(seed=args.seed).fit(sq["latency"], sq["exits"])
    stolen_q, stolen_z = stealer.predict(tq["latency"]), stealer.predict(tz["latency"])
    stealing = {"accuracy": float((stolen_q == tq["exits"]).mean()),
                "chance_majority_exit": float(np.bincount(tq["exits"]).max() / len(tq["exits"])),
                "population_accuracy": float((stolen_z == tz["exits"]).mean())}

    y_q, y_s, y_z = ds.y[q_idx], ds.y[s_idx], ds.y[z_idx]
    shadow_sig = make_signals(sq, y_s, s_idx, s_member, sq["exits"], None, args.exits)
    results: dict[str, Any] = {}
    scores: dict[str, dict[str, np.ndarray]] = {"1": {}, "2": {}}
    for adv, exits_q, exits_z in (("1", tq["exits"], tz["exits"]), ("2", stolen_q, stolen_z)):
        target = make_signals(tq, y_q, q_idx, member, exits_q, ref_q, args.exits)
        population = make_signals(tz, y_z, z_idx, np.zeros(len(z_idx), bool), exits_z, ref_z, args.exits)
        pair = paired_shadow(target, 0)
        # exit-oblivious attacks do not read exits: computed once (adversary 1) and shared with adversary 2
        hybrids = ("", "-hybrid") if adv == "1" else ("-hybrid",)
        if adv == "2":
            scores["2"].update({n: s for n, s in scores["1"].items() if "hybrid" not in n})
        for name in CLASSIC:
            for hyb in hybrids:
                a = get_attack(name + hyb, seed=args.seed).fit(shadow_sig)
                scores[adv][name + hyb] = a.score(target)
        for name in REFERENCE:
            for hyb in hybrids:
                kw = {"population": population} if name.startswith("rmia") else {}
                a = get_attack(name + hyb, seed=args.seed, **kw).fit(pair)
                scores[adv][name + hyb] = a.score(target)
        # the single-reference versions: the shadow model is the one OUT reference (no extra training)
        one_t = make_signals(tq, y_q, q_idx, member, exits_q,
                             single_reference(shadow_on_target["probs"], y_q, shadow_on_target["exits"]), args.exits)
        one_s = make_signals(sq, y_s, s_idx, s_member, sq["exits"],
                             single_reference(target_on_shadow["probs"], y_s, target_on_shadow["exits"]), args.exits)
        for name in ("lira-offline", "rmia-offline"):
            for hyb in hybrids:
                a = get_attack(name + hyb, seed=args.seed).fit(one_s)
                scores[adv][f"{name}{hyb} (shadow only)"] = a.score(one_t)

        rows_adv = {}
        for name, s in scores[adv].items():
            m = attack_metrics(member, s, threshold=float(np.median(s)), n_bootstrap=args.bootstrap, seed=args.seed,
                               fprs=(0.001, 0.01))
            rows_adv[name] = {"auc": m["auc"], "tpr_at_fpr": m["tpr_at_fpr"], "low_fpr": low_fpr_tpr(member, s),
                              "significance": significance_statement(m)}
        classic = [n for n in rows_adv if n.split("-")[0] in CLASSIC]
        reference = [n for n in rows_adv if n not in classic]
        best_classic = max(classic, key=lambda n: rows_adv[n]["tpr_at_fpr"]["0.01"]["value"])
        comparisons = {}
        for name in reference:
            comparisons[f"{name} vs {best_classic}"] = paired_bootstrap(
                member, scores[adv][best_classic], scores[adv][name], n_bootstrap=args.bootstrap, seed=args.seed)
        for name in [*REFERENCE, "lira-offline (shadow only)", "rmia-offline (shadow only)"]:
            hybrid = name.replace(" (", "-hybrid (") if "shadow only" in name else name + "-hybrid"
            comparisons[f"{hybrid} vs {name}"] = paired_bootstrap(
                member, scores[adv][name], scores[adv][hybrid], n_bootstrap=args.bootstrap, seed=args.seed)
        results[adv] = {"attacks": rows_adv, "best_shadow_model_attack_at_tpr1": best_classic,
                        "paired": comparisons}

    out = {
        "protocol": {"dataset": "location", "arch": "fcn18-1", "exits": args.exits, "epochs": args.epochs,
                     "paper_epochs": 100, "threshold": args.threshold, "seed": args.seed,
                     "reference_models": len(refs), "reference_pool": len(pool),
                     "reference_train_size": len(refs.models[0].train_index),
                     "target_train_size": len(sp.target_train), "queries": len(q_idx),
                     "members": int(member.sum()), "nonmembers": int((~member).sum()),
                     "rmia_population": len(z_idx), "latency_repeats": args.repeats,
                     "reference_attacks_fitted_on": "paired reference 0 (paired_shadow)",
                     "best_shadow_model_attack": "chosen on the target by TPR@1% FPR (optimistic for the baseline)"},
        "stealing_adversary2": stealing,
        "adversaries": results,
        "seconds": {"train_target_shadow": roles_s, "train_references": refs_s, "queries": query_s,
                    "total": time.perf_counter() - t_start},
        "reference_metrics": [m.metrics for m in refs.models],
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
        "command": " ".join(["python benchmarks/lira_rmia_location.py", f"--data-root {args.data_root}",
                             f"--models {args.models}", f"--epochs {args.epochs}", f"--threshold {args.threshold}",
                             f"--workers {args.workers}", f"--repeats {args.repeats}", f"--work {args.work}"]),
        "provenance": provenance(seed=args.seed),
    }
    atomic_write_json(args.out, out)
    np.savez_compressed(work / "scores.npz", member=member, sample_index=q_idx,
                        **{f"adv{adv}/{name}": s for adv, d in scores.items() for name, s in d.items()})
    for adv in ("1", "2"):
        print(f"adversary {adv}:")
        for name, r in results[adv]["attacks"].items():
            lf = r["low_fpr"]["0.01"]
            print(f"  {name:34s} AUC {r['auc']['value']:.3f} [{r['auc']['ci'][0]:.3f}, {r['auc']['ci'][1]:.3f}]  "
                  f"TPR@1% {lf['value'] if lf['value'] is None else round(lf['value'], 3)} {lf.get('ci')}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

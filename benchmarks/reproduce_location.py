"""Reproduce Li et al. (CCS'22) on Location under the paper's protocol, through the mexit library.

Two phases, so that the (long) training can start before the evaluation is decided and be resumed:

    python benchmarks/reproduce_location.py train    [--epochs 50] [--seeds 0 1 2] [--exits 1 4 6] [--role target]
    python benchmarks/reproduce_location.py evaluate [--epochs 50] [--seeds 0 1 2] [--exits 1 4 6]
    python benchmarks/reproduce_location.py table    [--epochs 50]      (re-render the markdown from the JSON)

``train`` trains FCN-18-1 target and shadow models (one partition per seed, initial weights seeded from
(seed, role)) in ``runs/repro/location/e{EPOCHS}/s{SEED}/fcn18-1-x{EXITS}-{ROLE}``; finished runs are reused.
``evaluate`` picks τ by the paper's rule (cheapest τ whose multi-exit validation accuracy is within the
tolerance of the *vanilla* model of the same seed and role), exports bundles, and runs the registry's attacks
in-process (see ``evaluate`` below); it writes ``benchmarks/results/reproduce_location_e{EPOCHS}.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import mean_sd  # a sibling script, importable once its folder is on sys.path

from mexit._io import atomic_write_bytes, atomic_write_json, provenance

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "location"  # --data-root overrides
ARCH = "fcn18-1"


def run_dir(epochs: int, seed: int, exits: int, role: str) -> Path:
    """Where one (seed, exits, role) model of the reproduction lives."""
    return ROOT / "runs" / "repro" / "location" / f"e{epochs}" / f"s{seed}" / f"{ARCH}-x{exits}-{role}"


def train(epochs: int, seeds: list[int], exits: list[int], roles: list[str], threads: int) -> None:
    """Train every (seed, exits, role) model, seed-major so that a cut-short run still has whole seeds."""
    from mexit.train.runner import make_config, train_run

    for seed in seeds:
        for ex in exits:
            for role in roles:
                cfg = make_config(dataset="location", data_root=DATA, arch=ARCH, exits=ex, epochs=epochs, seed=seed,
                                  role=role, threads=threads)
                t0 = time.perf_counter()
                m = train_run(cfg, run_dir(epochs, seed, ex, role), progress=False)
                logging.info("seed %d x%d %s: train %.3f test %.3f (%.0f s)", seed, ex, role,
                             m["final_exit"]["train_accuracy"], m["final_exit"]["test_accuracy"],
                             time.perf_counter() - t0)


N_QUERY = 500  # members and as many non-members per deployment (of ~1,127 per split)
# Threshold rules are cheap enough for every τ of the grid; the learned score MLPs run at the deployed τ only.
CHEAP = ("loss", "confidence", "loss-hybrid", "confidence-hybrid", "exit-only")
LEARNED = ("score", "score-hybrid")


def _query_set(run: Any, members: np.ndarray, non_members: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    k = min(N_QUERY, len(members), len(non_members))
    idx = np.concatenate([rng.choice(members, k, replace=False), rng.choice(non_members, k, replace=False)])
    return run.dataset.inputs(idx), run.dataset.y[idx], np.r_[np.ones(k, bool), np.zeros(k, bool)]


def _bundle(run: Any, tau: float, out: Path) -> Path:
    """Export a run once (the threshold is overridden per runtime anyway); reuse a finished export."""
    from mexit.export import export_bundle

    if (out / "manifest.json").exists():
        return out
    val = run.splits.shadow_val if run.config.role == "shadow" else run.splits.target_val
    return export_bundle(run.model, out, sample_inputs=run.dataset.inputs(val[:32]), threshold=tau,
                         dataset_name=run.dataset.name, dataset_kind=run.dataset.kind, exporter="legacy",
                         save_torch_programs=False, overwrite=True)


def _per_exit_leakage(target_bundle: Path, shadow_bundle: Path, tq: tuple, sq: tuple, exits: int,
                      seed: int) -> list[dict[str, float]]:
    """Membership AUC of the original attacks when every sample is answered by exit k (forced), per k."""
    from mexit.attacks.signals import Signals, cross_entropy
    from mexit.attacks.tau_sweep import attack_leakage
    from mexit.runtime import EarlyExitRuntime

    rows = []
    for k in range(exits):
        sigs = []
        for bundle, (x, y, m) in ((shadow_bundle, sq), (target_bundle, tq)):
            pred = EarlyExitRuntime(bundle).predict(x, force_exit=k)
            p = pred.probs.astype(np.float32)
            sigs.append(Signals(member=m, true_label=y, pred_label=pred.labels, sample_index=np.arange(len(y)),
                                num_exits=exits, num_classes=p.shape[1], probs=p, loss=cross_entropy(p, y)))
        leak = attack_leakage(sigs[0], sigs[1], ("loss", "confidence"), seed=seed)
        rows.append({"exit": k, **{f"{n}_auc": v["auc"] for n, v in leak.items()},
                     "best_auc": max(v["auc"] for v in leak.values())})
    return rows


def evaluate(epochs: int, seeds: list[int], exits: list[int], tolerance: float, out: Path) -> dict[str, Any]:
    """Per seed: τ by the paper's rule, bundles, the τ sweep (attacks in-process) and per-exit leakage."""
    from mexit.attacks.tau_sweep import TAU_GRID, tau_sweep
    from mexit.data.splits import check_disjoint
    from mexit.runtime import EarlyExitRuntime
    from mexit.train.runner import load_run, rechoose_threshold
    from mexit.train.threshold import vanilla_accuracy

    per_seed: list[dict[str, Any]] = []
    if out.exists():  # resumable: keep the seeds already evaluated with the same settings
        old = json.loads(out.read_text())
        if (old.get("epochs"), old.get("exits"), old.get("tolerance"), old.get("n_query")) == (epochs, exits,
                                                                                             tolerance, N_QUERY):
            per_seed = [r for r in old["per_seed"] if r["seed"] in seeds]
    done = {r["seed"] for r in per_seed}
    for seed in seeds:
        if seed in done:
            logging.info("seed %d already evaluated in %s", seed, out)
            continue
        runs = {(ex, role): load_run(run_dir(epochs, seed, ex, role), data_root=DATA)
                for ex in sorted(set(exits) | {1}) for role in ("target", "shadow")}
        for ex in exits:
            check_disjoint(runs[(ex, "target")].splits, runs[(ex, "shadow")].splits)
        tq = _query_set(runs[(1, "target")], runs[(1, "target")].splits.target_train,
                        runs[(1, "target")].splits.target_test, seed)
        sq = _query_set(runs[(1, "shadow")], runs[(1, "shadow")].splits.shadow_train,
                        runs[(1, "shadow")].splits.shadow_test, seed + 1000)
        bundles, taus = {}, {}
        for (ex, role), run in runs.items():
            rdir = run_dir(epochs, seed, ex, role)
            van = vanilla_accuracy(run_dir(epochs, seed, 1, role), arch=ARCH, dataset="location")
            final_rule = rechoose_threshold(rdir, rule="final-exit", tolerance=tolerance)["threshold"]
            metrics = rechoose_threshold(rdir, rule="vanilla", vanilla_accuracy=van, tolerance=tolerance)
            taus[(ex, role)] = {"vanilla_rule": metrics["threshold"]["tau"], "final_exit_rule": final_rule["tau"],
                                "vanilla_val_accuracy": van, "final_exit_val_accuracy":
                                metrics["final_exit"]["val_accuracy"], "within_tolerance":
                                metrics["threshold"]["within_tolerance"], "curve": metrics["threshold"]["curve"]}
            bundles[(ex, role)] = _bundle(run, metrics["threshold"]["tau"], ROOT / "bundles" / "repro" / "location" /
                                          f"e{epochs}" / f"s{seed}" / f"{ARCH}-x{ex}-{role}")
        vanilla_rt = (EarlyExitRuntime(bundles[(1, "target")]), EarlyExitRuntime(bundles[(1, "shadow")]))
        record: dict[str, Any] = {"seed": seed, "models": {}}
        for ex in exits:
            tau = taus[(ex, "target")]["vanilla_rule"]
            t0 = time.perf_counter()
            make_t = lambda t, b=bundles[(ex, "target")]: EarlyExitRuntime(b, threshold=t)  # noqa: E731
            make_s = lambda t, b=bundles[(ex, "shadow")]: EarlyExitRuntime(b, threshold=t)  # noqa: E731
            names = [a for a in (*CHEAP, *LEARNED) if ex > 1 or not a.endswith(("hybrid", "only"))]
            deployed = tau_sweep(make_t, make_s, tq, sq, grid=[1.0 if ex == 1 else tau], attacks=names,
                                 vanilla=vanilla_rt, deployed_tau=tau, seed=seed)
            sweep = None if ex == 1 else tau_sweep(make_t, make_s, tq, sq, grid=TAU_GRID, attacks=list(CHEAP),
                                                   vanilla=vanilla_rt, deployed_tau=tau, seed=seed)
            m = runs[(ex, "target")].metrics
            record["models"][str(ex)] = {
                "tau": taus[(ex, "target")], "shadow_tau": {k: v for k, v in taus[(ex, "shadow")].items()
                                                            if k != "curve"},
                "final_exit": m["final_exit"], "per_exit": m["per_exit"], "sweep": sweep,
                "deployed": deployed["rows"][0], "reference": deployed["reference"],
                "per_exit_leakage": _per_exit_leakage(bundles[(ex, "target")], bundles[(ex, "shadow")], tq, sq, ex,
                                                      seed),
            }
            logging.info("seed %d x%d: τ=%.2f sweep in %.0f s", seed, ex, tau, time.perf_counter() - t0)
        per_seed.append(record)
        per_seed.sort(key=lambda r: r["seed"])
        atomic_write_json(out, {"epochs": epochs, "seeds": [r["seed"] for r in per_seed], "exits": exits,
                                "tolerance": tolerance, "n_query": N_QUERY, "per_seed": per_seed,
                                "provenance": provenance()})
    return {"per_seed": per_seed}


LABEL_ONLY_TAU = 0.9  # exits spread at this τ; at the paper-rule τ nearly every sample leaves at exit 0
LABEL_ONLY_N = 500  # members and as many non-members per deployment (all of the evaluate query set)
LABEL_ONLY_COPIES = 100  # noisy copies per sample (the registry default)


class _LabelOracle:
    """A label-only view of an in-process deployment (``infer(x).outputs["label"]``, like the OIP client)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def infer(self, x: np.ndarray) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(outputs={"label": self.runtime.predict(x).labels})


def label_only(epochs: int, seeds: list[int], out: Path) -> None:
    """Label-only and label-only-hybrid ASR/AUC for the 6-exit model at τ = 0.9 and the vanilla model, per seed.

    The flip probability is chosen on the shadow deployment only (``choose_flip_probability``), as the paper's
    "threshold ... derived by perturbing the shadow dataset on shadow model" (line 154).
    """
    from dataclasses import replace

    from mexit.attacks.mia.label_only import FLIP_GRID, choose_flip_probability, flip_robustness
    from mexit.attacks.tau_sweep import attack_leakage, runtime_signals
    from mexit.runtime import EarlyExitRuntime
    from mexit.train.runner import load_run

    records = json.loads(out.read_text()) if out.exists() else {"epochs": epochs, "per_seed": []}
    done = {r["seed"] for r in records["per_seed"]}
    for seed in seeds:
        if seed in done:
            continue
        bdir = ROOT / "bundles" / "repro" / "location" / f"e{epochs}" / f"s{seed}"
        run = load_run(run_dir(epochs, seed, 1, "target"), data_root=DATA)
        rng_n = LABEL_ONLY_N
        tq = _query_set(run, run.splits.target_train, run.splits.target_test, seed)
        sq = _query_set(run, run.splits.shadow_train, run.splits.shadow_test, seed + 1000)
        tq = tuple(np.concatenate([a[:rng_n], a[N_QUERY:N_QUERY + rng_n]]) for a in tq)
        sq = tuple(np.concatenate([a[:rng_n], a[N_QUERY:N_QUERY + rng_n]]) for a in sq)
        rec: dict[str, Any] = {"seed": seed, "tau": LABEL_ONLY_TAU, "copies": LABEL_ONLY_COPIES}
        for ex, names in ((6, ("label-only", "label-only-hybrid", "exit-only")), (1, ("label-only",))):
            t_rt = EarlyExitRuntime(bdir / f"{ARCH}-x{ex}-target", threshold=LABEL_ONLY_TAU)
            s_rt = EarlyExitRuntime(bdir / f"{ARCH}-x{ex}-shadow", threshold=LABEL_ONLY_TAU)
            t0 = time.perf_counter()
            choice = choose_flip_probability(_LabelOracle(s_rt), sq[0], sq[1], sq[2], grid=FLIP_GRID,
                                             n_noisy=LABEL_ONLY_COPIES, seed=seed)
            t_scores = flip_robustness(_LabelOracle(t_rt), tq[0], tq[1], flip_probability=choice.flip_probability,
                                       n_noisy=LABEL_ONLY_COPIES, seed=seed + 1)
            shadow = replace(runtime_signals(s_rt, *sq), label_only_score=choice.shadow_scores)
            target = replace(runtime_signals(t_rt, *tq), label_only_score=t_scores)
            leak = attack_leakage(shadow, target, names, seed=seed)
            rec[str(ex)] = {"flip_probability": choice.flip_probability, "attacks": leak}
            logging.info("seed %d x%d label-only in %.0f s: %s", seed, ex, time.perf_counter() - t0, rec[str(ex)])
        records["per_seed"].append(rec)
        atomic_write_json(out, records)


ADV3_TAU = 0.9  # as for claims 4-5: at the paper-rule τ every sample leaves at exit 0 and there is no exit to steal
ADV3_ATTACKS = ["score", "score-hybrid", "loss", "loss-hybrid", "confidence", "confidence-hybrid", "exit-only"]


def adversary3(epochs: int, seeds: list[int], threads: int, samples: int, out: Path) -> None:
    """Adversaries 1-3 on the 6-exit model at τ = 0.9, adversary 3's shadow trained on *other data*.

    Paper Sec. 4.3 / Fig. 18 ("when the shadow dataset is distributed differently from the target dataset",
    line 370). With Location alone, "other data" is a label shift: the shadow is trained on a subset of the
    shadow parts in which half of the classes keep a quarter of their samples (``--subset class-skewed``), so
    its class prior differs from the target's stratified one (the total-variation distance is recorded). The
    exits of adversaries 2 and 3 are stolen from in-process response times (adaptive querying, mean budget 3
    per target sample); their hybrids are fitted on cross-fitted *stolen* shadow exits. One ``mexit attack``
    flow per seed (``flow.attack_deployments``).
    """
    from mexit.attacks.flow import attack_deployments
    from mexit.train.runner import load_run, make_config, train_run

    records = json.loads(out.read_text()) if out.exists() else {"epochs": epochs, "tau": ADV3_TAU, "per_seed": []}
    done = {r["seed"] for r in records["per_seed"]}
    for seed in seeds:
        if seed in done:
            continue
        s3_dir = run_dir(epochs, seed, 6, "shadow").with_name(f"{ARCH}-x6-shadow-skewed")
        t0 = time.perf_counter()
        train_run(make_config(dataset="location", data_root=DATA, arch=ARCH, exits=6, epochs=epochs, seed=seed,
                              role="shadow", subset="class-skewed", threads=threads), s3_dir, progress=False)
        logging.info("seed %d: class-skewed shadow trained in %.0f s", seed, time.perf_counter() - t0)
        bdir = ROOT / "bundles" / "repro" / "location" / f"e{epochs}" / f"s{seed}"
        where = {}
        for name, rdir in (("target", run_dir(epochs, seed, 6, "target")),
                           ("shadow", run_dir(epochs, seed, 6, "shadow")), ("shadow3", s3_dir)):
            where[name] = (rdir, _bundle(load_run(rdir, data_root=DATA), ADV3_TAU, bdir / f"{rdir.name}-t{ADV3_TAU}"))
        t0 = time.perf_counter()
        res = attack_deployments(
            target=str(where["target"][1]), target_run=where["target"][0], shadow=str(where["shadow"][1]),
            shadow_run=where["shadow"][0], shadow3=str(where["shadow3"][1]), shadow3_run=where["shadow3"][0],
            out=run_dir(epochs, seed, 6, "target").parent / "attack-adversary3", attacks=ADV3_ATTACKS,
            adversaries=[1, 2, 3], samples=samples, repeats=5, query_budget=3.0, seed=seed, threads=1,
            data_root=DATA, progress=False)
        m3 = load_run(s3_dir, data_root=DATA).metrics
        records["per_seed"].append({"seed": seed, "label_shift": m3["data"]["label_shift"],
                                    "shadow3_final_exit": m3["final_exit"], "shadow3_train": m3["split_sizes"]["train"],
                                    "adversaries": res["adversaries"], "exit_stealing": res["exit_stealing"],
                                    "plan": res["plan"], "samples": res["samples"]})
        logging.info("seed %d: adversaries 1-3 in %.0f s", seed, time.perf_counter() - t0)
        records["per_seed"].sort(key=lambda r: r["seed"])
        records["provenance"] = provenance()
        atomic_write_json(out, records)


def adversary3_table(path: Path) -> str:
    """Markdown: per adversary, exit accuracy, best original vs best hybrid AUC, and per hybrid/original pair the
    paired AUC difference (mean ± sd over seeds) with how many seeds' paired intervals lie above / below 0."""
    r = json.loads(path.read_text())
    seeds = r["per_seed"]
    pair_names = [p["hybrid"] for p in seeds[0]["adversaries"]["1"]["pairs"]]
    head = " | ".join(f"{n} − original" for n in pair_names)
    rows = [f"| adversary | exits from | exit accuracy | best original AUC | best hybrid AUC | {head} |",
            "|---|---|---|---|---|" + "---|" * len(pair_names)]
    for adv in ("1", "2", "3"):
        per = [s["adversaries"][adv] for s in seeds if adv in s["adversaries"]]
        if not per:
            continue
        cells = []
        for name in pair_names:
            diffs = [next(p for p in a["pairs"] if p["hybrid"] == name)["paired"]["auc"] for a in per]
            up = sum(d["ci"][0] > 0 for d in diffs)
            down = sum(d["ci"][1] < 0 for d in diffs)
            cells.append(f"{mean_sd([x['difference'] for x in diffs], '+.3f')} (↑{up} ↓{down})")
        best_o = mean_sd([a["best_original"]["auc"] for a in per])
        best_h = mean_sd([a["best_hybrid"]["auc"] for a in per])
        rows.append(f"| {adv} | {per[0]['exit_source']} | {mean_sd([a['exit_accuracy'] for a in per])} | {best_o} | "
                    f"{best_h} | " + " | ".join(cells) + " |")
    shift = mean_sd([s["label_shift"] for s in seeds])
    return "\n".join(rows) + (f"\n\nSeeds {', '.join(str(s['seed']) for s in seeds)}; τ = {r['tau']}; ↑/↓: seeds whose "
                              "paired 95 % interval lies above / below 0. Label shift of adversary 3's training data "
                              f"vs the target's (total variation): {shift}\n")


def _sign(diffs: list[float], *, expect_positive: bool, margin: float = 0.0) -> str:
    """Verdict from per-seed differences: every seed agrees with the paper / every seed disagrees / mixed.

    ``margin``: for a claim of a *clear* effect ("clearly higher ASR", line 271), a seed agrees only if its
    difference exceeds the margin in the paper's direction; one that does not (no gain, or the opposite) counts
    as disagreeing.
    """
    d = np.asarray(diffs, dtype=float)
    if len(d) < 3:
        return "inconclusive (fewer than 3 seeds)"
    ok = d > margin if expect_positive else d < -margin
    if ok.all():
        return "reproduces"
    if (~ok).all():
        return "contradicts"
    return "inconclusive"


def table(path: Path) -> str:
    """Markdown tables (mean ± sd over seeds) and the per-claim numbers of one ``evaluate`` JSON."""
    r = json.loads(path.read_text())
    seeds = r["per_seed"]
    exits = [str(e) for e in sorted({int(k) for s in seeds for k in s["models"]})]
    lines = [f"Location FCN-18-1, {r['epochs']} epochs, seeds {[s['seed'] for s in seeds]}, {r['n_query']} members + "
             f"{r['n_query']} non-members per deployment, τ by the paper's rule (tolerance {r['tolerance']}); "
             "mean ± sd over seeds.", ""]
    head = ("| exits | τ (paper rule / final-exit rule) | deployed acc. members / non-members | final-exit acc. "
            "train / test | members at exit 0 / non-members at exit 0 | mean FLOPs | score AUC | loss AUC | "
            "confidence AUC | score ASR | loss ASR | score-hybrid AUC | loss-hybrid AUC | exit-only AUC |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for ex in exits:
        ms = [s["models"][ex] for s in seeds if ex in s["models"]]

        def att(name: str, metric: str, ms: list = ms) -> str:
            return mean_sd([m["deployed"]["attacks"].get(name, {}) and m["deployed"]["attacks"][name][metric]
                        if m["deployed"]["attacks"].get(name) else None for m in ms])

        lines.append(
            f"| {ex} | {mean_sd([m['tau']['vanilla_rule'] for m in ms], '.2f')} / "
            f"{mean_sd([m['tau']['final_exit_rule'] for m in ms], '.2f')} | "
            f"{mean_sd([m['deployed']['accuracy_members'] for m in ms])} / "
            f"{mean_sd([m['deployed']['accuracy_nonmembers'] for m in ms])} | "
            f"{mean_sd([m['final_exit']['train_accuracy'] for m in ms])} / "
            f"{mean_sd([m['final_exit']['test_accuracy'] for m in ms])} | "
            f"{mean_sd([m['deployed']['exit_shares_members'][0] for m in ms], '.2f')} / "
            f"{mean_sd([m['deployed']['exit_shares_nonmembers'][0] for m in ms], '.2f')} | "
            f"{mean_sd([m['deployed']['mean_flops_fraction'] for m in ms], '.2f')} | "
            f"{att('score', 'auc')} | {att('loss', 'auc')} | {att('confidence', 'auc')} | "
            f"{att('score', 'balanced_accuracy')} | {att('loss', 'balanced_accuracy')} | "
            f"{att('score-hybrid', 'auc')} | {att('loss-hybrid', 'auc')} | {att('exit-only', 'auc')} |")
    lines += ["", "τ sweep (cheap attacks: loss, confidence, their hybrids, exit-only; best AUC over them):", ""]
    head = ("| exits | τ | best original AUC | best hybrid AUC | best original ASR | best hybrid ASR | exit-only AUC | "
            "mean FLOPs | acc. members / non-members |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for ex in exits[1:] if exits[0] == "1" else exits:
        ms = [s["models"][ex] for s in seeds if ex in s["models"] and s["models"][ex]["sweep"]]
        for i, row in enumerate(ms[0]["sweep"]["rows"]):
            if i % 2:
                continue
            rows = [m["sweep"]["rows"][i] for m in ms]
            cols = [mean_sd([x[k] for x in rows]) for k in ("best_original_auc", "best_hybrid_auc", "best_original_asr",
                                                         "best_hybrid_asr", "exit_only_auc")]
            cols.append(mean_sd([x["mean_flops_fraction"] for x in rows], ".2f"))
            cols.append(f"{mean_sd([x['accuracy_members'] for x in rows])} / "
                        f"{mean_sd([x['accuracy_nonmembers'] for x in rows])}")
            lines.append(f"| {ex} | {row['tau']:.2f} | " + " | ".join(cols) + " |")
    van = [s["models"][exits[0]]["reference"]["vanilla"]["best_original_auc"] for s in seeds]
    lines += ["", f"Vanilla model (1 exit), best original AUC (loss/confidence/score): {mean_sd(van)}", ""]
    lines += ["Per-exit leakage (every sample answered by exit k; best of loss/confidence AUC):", ""]
    for ex in exits:
        ms = [s["models"][ex] for s in seeds if ex in s["models"]]
        per = [mean_sd([m["per_exit_leakage"][k]["best_auc"] for m in ms]) for k in range(int(ex))]
        lines.append(f"* {ex} exits: " + ", ".join(f"exit {k}: {v}" for k, v in enumerate(per)))
    lines += ["", "Claims (per-seed differences; verdict = sign agrees with the paper in every seed):", ""]
    for ex in exits:
        if ex == "1":
            continue
        ms = [s["models"][ex] for s in seeds]
        d_dep = [m["deployed"]["best_original_auc"] - m["reference"]["vanilla"]["best_original_auc"] for m in ms]
        below = [float(np.mean([row["best_original_auc"] < m["reference"]["vanilla"]["best_original_auc"]
                                for row in m["sweep"]["rows"]])) for m in ms]
        d_hyb = [m["deployed"]["attacks"]["score-hybrid"]["auc"] - m["deployed"]["attacks"]["score"]["auc"]
                 if m["deployed"]["attacks"].get("score-hybrid") else 0.0 for m in ms]
        early = [m["deployed"]["exit_shares_members"][0] - m["deployed"]["exit_shares_nonmembers"][0] for m in ms]
        depth = [m["per_exit_leakage"][-1]["best_auc"] - m["per_exit_leakage"][0]["best_auc"] for m in ms]
        at9 = [next(row for row in m["sweep"]["rows"] if abs(row["tau"] - 0.9) < 1e-9) for m in ms]
        early9 = [row["exit_shares_members"][0] - row["exit_shares_nonmembers"][0] for row in at9]
        hyb9 = [row["best_hybrid_asr"] - row["best_original_asr"] for row in at9]
        lines.append(f"* {ex} exits at τ = 0.9 (exits spread): members − non-members leaving at exit 0 "
                     f"{mean_sd(early9)} "
                     f"({_sign(early9, expect_positive=True)}); "
                     f"exit-only AUC {mean_sd([r['exit_only_auc'] for r in at9])}; "
                     f"best hybrid − best original ASR {mean_sd(hyb9)} "
                     f"({_sign(hyb9, expect_positive=True, margin=0.01)}, margin 0.01)")
        lines.append(f"* {ex} exits: multi-exit − vanilla best original AUC at the deployed τ {mean_sd(d_dep)} "
                     f"({_sign(d_dep, expect_positive=False)}); share of the τ grid where multi-exit leaks less than "
                     f"vanilla {mean_sd(below, '.2f')}; score-hybrid − score AUC {mean_sd(d_hyb)} "
                     f"({_sign(d_hyb, expect_positive=True)}); members − non-members leaving at exit 0 "
                     f"{mean_sd(early)} "
                     f"({_sign(early, expect_positive=True)}); last − first exit AUC (forced) {mean_sd(depth)} "
                     f"({_sign(depth, expect_positive=True)})")
    if "4" in exits and "6" in exits:
        d_more = [s["models"]["6"]["deployed"]["best_original_auc"] - s["models"]["4"]["deployed"]["best_original_auc"]
                  for s in seeds]
        lines.append(f"* 6 − 4 exits, best original AUC at the deployed τ: {mean_sd(d_more)} "
                     f"({_sign(d_more, expect_positive=False)})")
    return "\n".join(lines) + "\n"


def figures(path: Path) -> None:
    """One τ-sweep figure per exit count (first seed) beside the JSON: ``…_tau_sweep_x{EXITS}.png``."""
    from mexit.attacks.tau_sweep import plot_tau_sweep

    r = json.loads(path.read_text())
    first = r["per_seed"][0]
    for ex, m in first["models"].items():
        if m["sweep"] is None:
            continue
        fig = plot_tau_sweep(m["sweep"], path.with_name(f"{path.stem}_tau_sweep_x{ex}.png"),
                             title=f"Location FCN-18-1, {ex} exits, {r['epochs']} epochs, seed {first['seed']} "
                                   f"(deployed τ = {m['tau']['vanilla_rule']:.2f}, paper's rule)")
        import matplotlib.pyplot as plt

        plt.close(fig)


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["train", "evaluate", "table", "label-only", "adversary3"])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--exits", type=int, nargs="+", default=[1, 6, 4])
    parser.add_argument("--role", choices=["target", "shadow"], nargs="+", default=["target", "shadow"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=300, help="adversary3: members (and non-members) queried")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--data-root", type=Path, default=None, help=f"Location data (default {DATA})")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/"
                        "reproduce_location_e{EPOCHS}.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.data_root is not None:
        DATA = args.data_root
    if args.phase == "train":
        train(args.epochs, args.seeds, args.exits, args.role, args.threads)
    elif args.phase == "adversary3":
        out = args.out or ROOT / "benchmarks" / "results" / f"reproduce_location_e{args.epochs}_adversary3.json"
        adversary3(args.epochs, args.seeds, args.threads, args.samples, out)
        md = adversary3_table(out)
        atomic_write_bytes(out.with_suffix(".md"), md.encode())
        print(md)
    elif args.phase == "label-only":
        out = args.out or ROOT / "benchmarks" / "results" / f"reproduce_location_e{args.epochs}_label_only.json"
        label_only(args.epochs, args.seeds, out)
    else:
        out = args.out or ROOT / "benchmarks" / "results" / f"reproduce_location_e{args.epochs}.json"
        if args.phase == "evaluate":
            evaluate(args.epochs, args.seeds, args.exits, args.tolerance, out)
        md = table(out)
        atomic_write_bytes(out.with_suffix(".md"), md.encode())
        figures(out)
        print(md)


if __name__ == "__main__":
    main()

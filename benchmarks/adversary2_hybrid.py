"""Adversary 2's hybrid attacks fitted on what they will see: the shadow's cross-fitted *stolen* exits.

Reads the signals ``adversary2_stealing.py --save-signals DIR`` recorded (``{kind}_shadow.npz`` and
``{kind}_target.npz``: a separately trained shadow and the target, queried in one interleaved schedule),
steals the target's exits with adversary 2's chosen stealer (:func:`mexit.attacks.stealing.steal_exits`),
and compares, for every score-based attack and its hybrid, three ways of fitting the hybrid on the shadow:

* ``true`` — the shadow's true exits (what ``shadow_view`` did: "shadow-known"),
* ``cross-fitted`` — the shadow's exits stolen by the same stealer fitted on the other folds
  (:func:`mexit.attacks.stealing.cross_fit_exits`), so the attack learns how reliable the exit feature is,

always scoring the target with its stolen exits. Each hybrid is compared with its original attack by a
paired bootstrap of the AUC difference (:func:`mexit.attacks.metrics.paired_bootstrap`, members and
non-members resampled together): the issue-16 goal is a difference interval not below 0.

    python benchmarks/adversary2_hybrid.py --signals DIR [--kinds plain,jittery] [--out JSON]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from mexit._io import atomic_write_json, provenance
from mexit.attacks.metrics import paired_bootstrap
from mexit.attacks.mia import get_attack
from mexit.attacks.signals import Signals
from mexit.attacks.stealing import cross_fit_exits, steal_exits

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "adversary2_hybrid.json"
PAIRS = (("score", "score-hybrid"), ("loss", "loss-hybrid"), ("confidence", "confidence-hybrid"))


def run_kind(shadow: Signals, target: Signals, *, seed: int, n_bootstrap: int) -> dict[str, Any]:
    k = target.num_exits
    res = steal_exits(target.latency_ns, shadow.latency_ns, shadow.true_exit, k, seed)
    chosen = res.choice.name
    stolen_target = target.with_exits(res.stolen["chosen"], f"stolen-{chosen}")
    views = {"true": shadow.with_exits(shadow.true_exit, "shadow-known"),
             "cross-fitted": shadow.with_exits(cross_fit_exits(shadow.latency_ns, shadow.true_exit, k, stealer=chosen,
                                                               seed=seed), f"cross-fitted-{chosen}")}
    out: dict[str, Any] = {
        "chosen": chosen, "target_exit_accuracy": float((res.stolen["chosen"] == target.true_exit).mean()),
        "shadow_cross_fitted_exit_accuracy": float((views["cross-fitted"].exit_index == shadow.true_exit).mean()),
        "attacks": {},
    }
    for original, hybrid in PAIRS:
        base = get_attack(original, seed=seed).fit(views["true"]).score(stolen_target)
        row: dict[str, Any] = {}
        for view, sv in views.items():
            scores = get_attack(hybrid, seed=seed).fit(sv).score(stolen_target)
            cmp = paired_bootstrap(target.member, base, scores, n_bootstrap=n_bootstrap, seed=seed)["auc"]
            row[view] = {"auc_original": cmp["a"], "auc_hybrid": cmp["b"], "difference": cmp["difference"],
                         "ci": cmp["ci"], "significant": cmp["significant"]}
        out["attacks"][hybrid] = row
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--signals", type=Path, required=True, help="folder of {kind}_shadow.npz / {kind}_target.npz")
    p.add_argument("--kinds", default="plain,jittery")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    result: dict[str, Any] = {"signals": str(args.signals), "kinds": {}}
    for kind in args.kinds.split(","):
        shadow = Signals.load(args.signals / f"{kind}_shadow.npz")
        target = Signals.load(args.signals / f"{kind}_target.npz")
        result["kinds"][kind] = run_kind(shadow, target, seed=args.seed, n_bootstrap=args.bootstrap)
    result["machine"] = {"cpu_count": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)}
    result["provenance"] = provenance(benchmark="adversary2_hybrid")
    atomic_write_json(args.out, result)
    print(json.dumps({kind: {h: {v: (round(r["auc_original"], 3), round(r["auc_hybrid"], 3),
                                     [round(c, 3) for c in r["ci"]]) for v, r in row.items()}
                             for h, row in res["attacks"].items()} for kind, res in result["kinds"].items()},
                     indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Location (FCN-18-1, 1..6 exits) through the CLI: train target and shadow models (initial weights seeded from
# (seed, role), one split per seed), pick τ by the paper's rule (within 1 % of the vanilla model's validation
# accuracy) unless THRESHOLD is given, export bundles, attack them in-process (timing included), and tabulate
# (benchmarks/results/reproduce_location.*). The multi-seed reproduction with the τ sweep is
# benchmarks/reproduce_location.py (docs/reproduction.md); this script is the single-seed CLI walk-through.
# Usage: bash benchmarks/reproduce_location.sh [EPOCHS] [THRESHOLD|paper] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-50}
TAU=${2:-paper}
SEED=${3:-0}
DATA=../shared/data/location
RUNS=runs/location/e$EPOCHS-s$SEED
BUNDLES=bundles/location/e$EPOCHS-s$SEED
for ex in 1 2 3 4 5 6; do
  for role in target shadow; do
    run=$RUNS/fcn18-1-x$ex-$role
    rule=()
    [ $ex -gt 1 ] && rule=(--tau-rule vanilla --vanilla-run $RUNS/fcn18-1-x1-$role)
    mexit train --dataset location --data-root $DATA --arch fcn18-1 --exits $ex --epochs $EPOCHS --role $role \
      --seed $SEED --threads 1 "${rule[@]}" --out $run >/dev/null
    threshold=()
    [ "$TAU" != paper ] && threshold=(--threshold $TAU)
    [ -f $BUNDLES/fcn18-1-x$ex-$role-t$TAU/manifest.json ] || \
      mexit export $run --out $BUNDLES/fcn18-1-x$ex-$role-t$TAU "${threshold[@]}" --overwrite >/dev/null 2>&1
  done
  attacks=score,loss,confidence,label-only
  [ $ex -gt 1 ] && attacks=$attacks,score-hybrid,loss-hybrid,confidence-hybrid,label-only-hybrid,exit-only
  mexit attack --target $BUNDLES/fcn18-1-x$ex-target-t$TAU --target-run $RUNS/fcn18-1-x$ex-target \
    --shadow $BUNDLES/fcn18-1-x$ex-shadow-t$TAU --shadow-run $RUNS/fcn18-1-x$ex-shadow \
    --samples 300 --repeats 5 --attacks $attacks --out $RUNS/attack-x$ex-t$TAU 2>/dev/null | tail -1
done
python benchmarks/tabulate_attacks.py $RUNS/attack-x{1,2,3,4,5,6}-t$TAU --out benchmarks/results/reproduce_location

#!/usr/bin/env bash
# Reproduce the paper's main comparisons on Location (FCN-18-1, 1..6 exits): train target and shadow
# models, export bundles, attack them in-process, and tabulate (benchmarks/results/reproduce_location.*).
# Usage: bash benchmarks/reproduce_location.sh [EPOCHS] [THRESHOLD]
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-50}
TAU=${2:-0.9}
DATA=../shared/data/location
for ex in 1 2 3 4 5 6; do
  for role in target shadow; do
    run=runs/location/fcn18-1-x$ex-$role
    mexit train --dataset location --data-root $DATA --arch fcn18-1 --exits $ex --epochs $EPOCHS --role $role \
      --threads 1 --out $run >/dev/null
    [ -f bundles/location/fcn18-1-x$ex-$role-t${TAU}/manifest.json ] || \
      mexit export $run --out bundles/location/fcn18-1-x$ex-$role-t${TAU} --threshold $TAU --overwrite >/dev/null 2>&1
  done
  attacks=score,loss,confidence,label-only
  [ $ex -gt 1 ] && attacks=$attacks,score-hybrid,loss-hybrid,confidence-hybrid,label-only-hybrid,exit-only
  mexit attack --target bundles/location/fcn18-1-x$ex-target-t${TAU} --target-run runs/location/fcn18-1-x$ex-target \
    --shadow bundles/location/fcn18-1-x$ex-shadow-t${TAU} --shadow-run runs/location/fcn18-1-x$ex-shadow \
    --samples 300 --repeats 5 --attacks $attacks --out runs/location/attack-x$ex-t${TAU} 2>/dev/null | tail -1
done
python benchmarks/tabulate_attacks.py runs/location/attack-x{1,2,3,4,5,6}-t${TAU} \
  --out benchmarks/results/reproduce_location

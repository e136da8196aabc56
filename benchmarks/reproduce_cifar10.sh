#!/usr/bin/env bash
# CIFAR-10 side of the reproduction (shared two-batch CIFAR-10): ResNet-56 vanilla vs 6 exits, target and
# shadow, CPU training on LIMIT samples per split; then in-process attacks.
# Usage: bash benchmarks/reproduce_cifar10.sh [EPOCHS] [LIMIT] [TAU] [JOBS]   (defaults 12 2000 0.5 2)
# JOBS=1 trains one model at a time (leaves a core free); runs land in runs/cifar10/e$EPOCHS-n$LIMIT/.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-12}
LIMIT=${2:-2000}
TAU=${3:-0.5}
JOBS=${4:-2}
DATA=../shared/data/cifar-10-batches-py
RUNS=runs/cifar10/e$EPOCHS-n$LIMIT
BUNDLES=bundles/cifar10/e$EPOCHS-n$LIMIT
train() {  # exits role
  mexit train --dataset cifar10 --data-root $DATA --arch resnet56 --exits $1 --epochs $EPOCHS --limit $LIMIT \
    --role $2 --threads 1 --out $RUNS/resnet56-x$1-$2 >/dev/null
  mexit export $RUNS/resnet56-x$1-$2 --out $BUNDLES/resnet56-x$1-$2-t$TAU --threshold $TAU \
    --exporter legacy --overwrite >/dev/null 2>&1
}
for ex in 6 1; do
  if [ "$JOBS" -gt 1 ]; then
    train $ex target & train $ex shadow & wait
  else
    train $ex target; train $ex shadow
  fi
done
for ex in 1 6; do
  attacks=score,loss,confidence
  [ $ex -gt 1 ] && attacks=$attacks,score-hybrid,loss-hybrid,confidence-hybrid,exit-only
  mexit attack --target $BUNDLES/resnet56-x$ex-target-t$TAU --target-run $RUNS/resnet56-x$ex-target \
    --shadow $BUNDLES/resnet56-x$ex-shadow-t$TAU --shadow-run $RUNS/resnet56-x$ex-shadow \
    --samples 300 --repeats 3 --attacks $attacks --out $RUNS/attack-x$ex-t$TAU 2>/dev/null | tail -1
done
python benchmarks/tabulate_attacks.py $RUNS/attack-x{1,6}-t$TAU --out benchmarks/results/reproduce_cifar10-e$EPOCHS-n$LIMIT

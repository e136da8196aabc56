#!/usr/bin/env bash
# CIFAR-10 side of the reproduction (shared two-batch CIFAR-10): ResNet-56 vanilla vs 6 exits, target and
# shadow, CPU training on LIMIT samples per split; then in-process attacks. TAU=paper (default) deploys the τ of
# the paper's rule (within 1 % of the vanilla model's validation accuracy); a number overrides it.
# Usage: bash benchmarks/reproduce_cifar10.sh [EPOCHS] [LIMIT] [TAU|paper] [JOBS]   (defaults 12 2000 paper 2)
# JOBS=1 trains one model at a time (leaves a core free); runs land in runs/cifar10/e$EPOCHS-n$LIMIT/.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-12}
LIMIT=${2:-2000}
TAU=${3:-paper}
JOBS=${4:-2}
DATA=../shared/data/cifar-10-batches-py
RUNS=runs/cifar10/e$EPOCHS-n$LIMIT
BUNDLES=bundles/cifar10/e$EPOCHS-n$LIMIT
train() {  # exits role
  local rule=() threshold=()
  [ "$1" -gt 1 ] && rule=(--tau-rule vanilla --vanilla-run $RUNS/resnet56-x1-$2)
  [ "$TAU" != paper ] && threshold=(--threshold $TAU)
  mexit train --dataset cifar10 --data-root $DATA --arch resnet56 --exits $1 --epochs $EPOCHS --limit $LIMIT \
    --role $2 --threads 1 "${rule[@]}" --out $RUNS/resnet56-x$1-$2 >/dev/null
  mexit export $RUNS/resnet56-x$1-$2 --out $BUNDLES/resnet56-x$1-$2-t$TAU "${threshold[@]}" \
    --exporter legacy --overwrite >/dev/null 2>&1
}
for ex in 1 6; do  # the vanilla model first: the paper's τ rule of the 6-exit model needs it
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

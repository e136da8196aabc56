#!/usr/bin/env bash
# CIFAR-10 side of the reproduction (shared two-batch CIFAR-10): ResNet-56 vanilla vs 6 exits, target and
# shadow, short CPU training; then in-process attacks. Usage: bash benchmarks/reproduce_cifar10.sh [EPOCHS] [LIMIT] [TAU] (defaults 12 2000 0.5)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-12}
LIMIT=${2:-2000}
TAU=${3:-0.5}
DATA=../shared/data/cifar-10-batches-py
train() {  # exits role
  mexit train --dataset cifar10 --data-root $DATA --arch resnet56 --exits $1 --epochs $EPOCHS --limit $LIMIT \
    --role $2 --threads 1 --out runs/cifar10/resnet56-x$1-$2 >/dev/null
  mexit export runs/cifar10/resnet56-x$1-$2 --out bundles/cifar10/resnet56-x$1-$2-t$TAU --threshold $TAU \
    --exporter legacy --overwrite >/dev/null 2>&1
}
for ex in 6 1; do
  train $ex target & train $ex shadow & wait
done
for ex in 1 6; do
  attacks=score,loss,confidence
  [ $ex -gt 1 ] && attacks=$attacks,score-hybrid,loss-hybrid,confidence-hybrid,exit-only
  mexit attack --target bundles/cifar10/resnet56-x$ex-target-t$TAU --target-run runs/cifar10/resnet56-x$ex-target \
    --shadow bundles/cifar10/resnet56-x$ex-shadow-t$TAU --shadow-run runs/cifar10/resnet56-x$ex-shadow \
    --samples 300 --repeats 3 --attacks $attacks --out runs/cifar10/attack-x$ex-t$TAU 2>/dev/null | tail -1
done
python benchmarks/tabulate_attacks.py runs/cifar10/attack-x{1,6}-t$TAU --out benchmarks/results/reproduce_cifar10

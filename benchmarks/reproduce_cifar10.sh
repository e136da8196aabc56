#!/usr/bin/env bash
# CIFAR-10 side of the reproduction (shared two-batch CIFAR-10): ResNet-56 vanilla vs 6 exits, target and
# shadow, CPU training on LIMIT samples per split; then in-process attacks. TAU=paper (default) deploys the τ of
# the paper's rule (within 1 % of the vanilla model's validation accuracy); a number overrides it.
# Usage: bash benchmarks/reproduce_cifar10.sh [EPOCHS] [LIMIT] [TAU|paper] [JOBS] [SHADOW3_ARCH]
#        (defaults 12 2000 paper 2, no adversary 3)
# JOBS=1 trains one model at a time (leaves a core free); runs land in runs/cifar10/e$EPOCHS-n$LIMIT/.
# SHADOW3_ARCH (e.g. vgg16): adversary 3 (paper Sec. 4.3, Fig. 17) — a 6-exit shadow of another architecture
# family, trained on the shadow split; the 6-exit attack then also runs adversary 3 with exits stolen from time.
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-12}
LIMIT=${2:-2000}
TAU=${3:-paper}
JOBS=${4:-2}
SHADOW3=${5:-}
DATA=../shared/data/cifar-10-batches-py
RUNS=runs/cifar10/e$EPOCHS-n$LIMIT
BUNDLES=bundles/cifar10/e$EPOCHS-n$LIMIT
train() {  # exits role [arch]
  local arch=${3:-resnet56} rule=() threshold=()
  [ "$1" -gt 1 ] && rule=(--tau-rule vanilla --vanilla-run $RUNS/resnet56-x1-$2)
  [ "$arch" != resnet56 ] && rule=(--tau-rule final-exit)  # the attacker has no vanilla model of its own arch
  [ "$TAU" != paper ] && threshold=(--threshold $TAU)
  mexit train --dataset cifar10 --data-root $DATA --arch $arch --exits $1 --epochs $EPOCHS --limit $LIMIT \
    --role $2 --threads 1 "${rule[@]}" --out $RUNS/$arch-x$1-$2 >/dev/null
  mexit export $RUNS/$arch-x$1-$2 --out $BUNDLES/$arch-x$1-$2-t$TAU "${threshold[@]}" \
    --exporter legacy --overwrite >/dev/null 2>&1
}
for ex in 1 6; do  # the vanilla model first: the paper's τ rule of the 6-exit model needs it
  if [ "$JOBS" -gt 1 ]; then
    train $ex target & train $ex shadow & wait
  else
    train $ex target; train $ex shadow
  fi
done
[ -n "$SHADOW3" ] && train 6 shadow "$SHADOW3"
for ex in 1 6; do
  attacks=score,loss,confidence
  adv3=()
  [ $ex -gt 1 ] && attacks=$attacks,score-hybrid,loss-hybrid,confidence-hybrid,exit-only
  [ $ex -gt 1 ] && [ -n "$SHADOW3" ] && adv3=(--shadow3 $BUNDLES/$SHADOW3-x6-shadow-t$TAU \
    --shadow3-run $RUNS/$SHADOW3-x6-shadow --adversary 1 --adversary 2 --adversary 3)
  mexit attack --target $BUNDLES/resnet56-x$ex-target-t$TAU --target-run $RUNS/resnet56-x$ex-target \
    --shadow $BUNDLES/resnet56-x$ex-shadow-t$TAU --shadow-run $RUNS/resnet56-x$ex-shadow \
    --samples 300 --repeats 3 --attacks $attacks "${adv3[@]}" --out $RUNS/attack-x$ex-t$TAU 2>/dev/null | tail -1
done
python benchmarks/tabulate_attacks.py $RUNS/attack-x{1,6}-t$TAU \
  --out benchmarks/results/reproduce_cifar10-e$EPOCHS-n$LIMIT$( [ "$TAU" = paper ] || echo "-t$TAU" )

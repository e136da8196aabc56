#!/usr/bin/env bash
# Every benchmark behind a README figure, one after the other (run on a quiet machine: timings!).
# Needs the runs and bundles of the README's "Reproducing the figures" section.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
python benchmarks/train_throughput.py --out $R/train_throughput.json
# The runtime rows use the targets of the Location and CIFAR-10 audits (docs/audits/README.md has their
# `mexit audit --out runs/audit-location …` / `runs/audit-cifar10 …` commands).
python benchmarks/runtime_latency.py --run runs/audit-location/train-target-*/run \
  --bundle runs/audit-location/export-target-*/bundle --repeats 7 --out $R/runtime_latency_location_fcn18-1_x6.json
# Folding Linear → BatchNorm1d at export (legacy exporter; the quick Location run of docs/results.md, /tmp/a2/t)
python benchmarks/export_batchnorm_fold.py --run /tmp/a2/t --rounds 1200 --out $R/export_batchnorm_fold.json
# ResNet-56: the CIFAR-10 reproduction's target (bash benchmarks/reproduce_cifar10.sh 50 600 paper 1 vgg16), τ 0.9
python benchmarks/runtime_latency.py --run runs/cifar10/e50-n600/resnet56-x6-target \
  --bundle bundles/cifar10/e50-n600/resnet56-x6-target-tpaper --threshold 0.9 --repeats 7 \
  --out $R/runtime_latency_cifar10_resnet56_x6.json
python benchmarks/serve_overhead.py --bundle bundles/location/fcn18-1-x6-target-t0.9 --out $R/serve_overhead.json
python benchmarks/serve_load.py --bundle bundles/location/fcn18-1-x6-target-t0.9 --out $R/serve_load.json
python benchmarks/defense_timeguard.py --out $R/defense_timeguard.json
python benchmarks/defense_throughput.py --seconds 3 --rounds 3 --out $R/defense_throughput.json
python benchmarks/idle_gap_latency.py --bundle runs/audit-location/export-target-*/bundle
python benchmarks/stealing_accuracy.py --bundle bundles/location/fcn18-1-x6-target-t0.9 \
  --run runs/location/fcn18-1-x6-target --out $R/stealing_accuracy_location.json
# Adversary 2 against plain and jittery stacks (bundles of docs/results.md, "Adversary 2 against real serving
# stacks"), the hybrids on the saved recording, and claim 8 over three Location audits (docs/reproduction.md).
python benchmarks/adversary2_stealing.py --target-bundle /tmp/a2/tb --target-run /tmp/a2/t \
  --shadow-bundle /tmp/a2/sb --shadow-run /tmp/a2/s --kinds plain,jittery --samples 200 --repeats 10 \
  --budgets 3,5,10,20 --unpaced-budgets 5,20 --save-signals runs/a2-signals --out $R/adversary2_stealing_rec8.json
python benchmarks/adversary2_hybrid.py --signals runs/a2-signals --out $R/adversary2_hybrid_rec8.json
# the jittery goal with the mirrored pacer and drift correction (docs/results.md, session 5), and its control
for s in 14 15 16 17; do
  for mode in final mirror_nodrift; do
    python benchmarks/adversary2_stealing.py --target-bundle /tmp/a2/tb --target-run /tmp/a2/t \
      --shadow-bundle /tmp/a2/sb --shadow-run /tmp/a2/s --kinds jittery --samples 200 --repeats 10 --budgets 20 \
      --seed $s $([ $mode = mirror_nodrift ] && echo --no-drift-correction) --out $R/adversary2_stealing_${mode}_n200_s$s.json
  done
done
python benchmarks/decision_pause.py --target-bundle /tmp/a2/tb --target-run /tmp/a2/t --shadow-bundle /tmp/a2/sb \
  --out $R/decision_pause.json
python benchmarks/timeguard_claim.py runs/audit-location-s0 runs/audit-location-s1 runs/audit-location-s2 \
  --out $R/timeguard_claim_location.json
# Issue 14, session 7: where a batch-1 early exit spends its time, and the timing channel with int8 heads
python benchmarks/runtime_breakdown.py --run runs/cifar10/e50-n600/resnet56-x6-target \
  --bundle bundles/cifar10/e50-n600/resnet56-x6-target-tpaper --threshold 0.9 --repeats 9
python benchmarks/runtime_breakdown.py --run runs/audit-location/train-target-*/run \
  --bundle runs/audit-location/export-target-*/bundle --repeats 7
# Issue 14, session 8: the batch-1 request path with and without numpy calls around the single graph's run
python benchmarks/request_path_numpy.py --run runs/audit-location/train-target-*/run \
  --bundle runs/audit-location/export-target-*/bundle --int8-heads --samples 1000
python benchmarks/request_path_numpy.py --run runs/cifar10/e50-n600/resnet56-x6-target \
  --bundle bundles/cifar10/e50-n600/resnet56-x6-target-tpaper --threshold 0.9 --int8-heads --samples 600
for s in 31 32 33 34 35; do
  n=$([ $s -ge 34 ] && echo 400 || echo 200)
  for m in float32 int8; do
    python benchmarks/adversary2_stealing.py --target-bundle /tmp/a2/tb --target-run /tmp/a2/t \
      --shadow-bundle /tmp/a2/sb --shadow-run /tmp/a2/s --kinds plain --samples $n --repeats 10 --budgets 2,3 \
      --seed $s $([ $m = int8 ] && echo --int8-heads) --out $R/adversary2_stealing_int8heads_${m}_n${n}_s$s.json
  done
done
# OpenVINO as a candidate backend (needs `pip install openvino`; not a dependency: it lost, see docs/results.md)
if python -c "import openvino" 2>/dev/null; then
  python benchmarks/openvino_vs_ort.py --run runs/cifar10/e50-n600/resnet56-x6-target \
    --bundle bundles/cifar10/e50-n600/resnet56-x6-target-tpaper --threshold 0.9
  python benchmarks/openvino_vs_ort.py --run runs/audit-location/train-target-*/run \
    --bundle runs/audit-location/export-target-*/bundle
fi
# A batch's early exit as one graph (batch_graph=True) against the per-stage chain
python benchmarks/batch_graph_throughput.py --run runs/audit-location/train-target-*/run \
  --bundle runs/audit-location/export-target-*/bundle --repeats 21
python benchmarks/batch_graph_throughput.py --run runs/cifar10/e50-n600/resnet56-x6-target \
  --bundle bundles/cifar10/e50-n600/resnet56-x6-target-tpaper --threshold 0.9 --repeats 7
# The chain's bookkeeping after the last stage against between stages (session 8's loop), paired in one run
python benchmarks/chain_bookkeeping.py --run runs/audit-location/train-target-*/run \
  --bundle runs/audit-location/export-target-*/bundle --repeats 31
python benchmarks/chain_bookkeeping.py --run runs/cifar10/e50-n600/resnet56-x6-target \
  --bundle bundles/cifar10/e50-n600/resnet56-x6-target-tpaper --threshold 0.9 --repeats 15

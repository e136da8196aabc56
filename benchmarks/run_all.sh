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
  --bundle runs/audit-location/export-target-*/bundle --out $R/runtime_latency_location_fcn18-1_x6.json
python benchmarks/runtime_latency.py --run runs/audit-cifar10/train-target-*/run \
  --bundle runs/audit-cifar10/export-target-*/bundle --threshold 0.6 --out $R/runtime_latency_cifar10_resnet56_x6.json
python benchmarks/serve_overhead.py --bundle bundles/location/fcn18-1-x6-target-t0.9 --out $R/serve_overhead.json
python benchmarks/serve_load.py --bundle bundles/location/fcn18-1-x6-target-t0.9 --out $R/serve_load.json
python benchmarks/defense_timeguard.py --out $R/defense_timeguard.json
python benchmarks/stealing_accuracy.py --bundle bundles/location/fcn18-1-x6-target-t0.9 \
  --run runs/location/fcn18-1-x6-target --out $R/stealing_accuracy_location.json

#!/usr/bin/env bash
# Every benchmark behind a README figure, one after the other (run on a quiet machine: timings!).
# Needs the runs and bundles of the README's "Reproducing the figures" section.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results
python benchmarks/train_throughput.py --out $R/train_throughput.json
python benchmarks/runtime_latency.py --run runs/location/fcn18-1-x6-target \
  --bundle bundles/location/fcn18-1-x6-target-t0.9
python benchmarks/runtime_latency.py --run runs/cifar10-resnet56-x6 --bundle bundles/cifar10-resnet56-x6 \
  --threshold 0.6 --rounds 150 --samples 300 --repeats 2
python benchmarks/serve_overhead.py --bundle bundles/location/fcn18-1-x6-target-t0.9 --out $R/serve_overhead.json
python benchmarks/serve_load.py --bundle bundles/location/fcn18-1-x6-target-t0.9 --out $R/serve_load.json
python benchmarks/defense_timeguard.py --out $R/defense_timeguard.json
python benchmarks/stealing_accuracy.py --bundle bundles/location/fcn18-1-x6-target-t0.9 \
  --run runs/location/fcn18-1-x6-target --out $R/stealing_accuracy_location.json

#!/usr/bin/env bash
# Every benchmark behind a README figure, one after the other (run on a quiet machine: timings!). `make bench`.
#
# The benchmarks time real runs and bundles; where they live is set below and can be overridden from the
# environment (e.g. `CIFAR_BUNDLE=bundles/cifar10/... make bench`). docs/results.md and docs/audits/README.md have
# the commands that produce each of them. A section whose inputs are missing is skipped with one line saying what
# is missing; the script lists the skipped sections at the end and then exits with status 1, so a partial rerun is
# never mistaken for a full one. `BENCH_LIST=1 bash benchmarks/run_all.sh` only lists what would run or be skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
R=benchmarks/results

first() {  # the first existing path among the arguments (globs expanded), else the first argument as given
  local p
  for p in "$@"; do [ -e "$p" ] && { echo "$p"; return; }; done
  echo "$1"
}

# Location audit target (`mexit audit --out runs/audit-location …`, docs/audits/README.md)
LOC_RUN=${LOC_RUN:-$(first runs/audit-location/train-target-*/run)}
LOC_BUNDLE=${LOC_BUNDLE:-$(first runs/audit-location/export-target-*/bundle)}
# CIFAR-10 reproduction target, ResNet-56 ×6 at τ 0.9 (bash benchmarks/reproduce_cifar10.sh 50 600 paper 1 vgg16;
# exported at the paper's τ or at 0.9: the benchmarks pass --threshold 0.9 either way)
CIFAR_RUN=${CIFAR_RUN:-runs/cifar10/e50-n600/resnet56-x6-target}
CIFAR_BUNDLE=${CIFAR_BUNDLE:-$(first bundles/cifar10/e50-n600/resnet56-x6-target-tpaper \
  bundles/cifar10/e50-n600/resnet56-x6-target-t0.9)}
# Location FCN-18-1 ×6 trained and exported by hand (docs/results.md, "serving")
LOC_PLAIN_RUN=${LOC_PLAIN_RUN:-runs/location/fcn18-1-x6-target}
LOC_PLAIN_BUNDLE=${LOC_PLAIN_BUNDLE:-bundles/location/fcn18-1-x6-target-t0.9}
# Adversary 2's quick Location target and shadow (docs/results.md, "Adversary 2 against real serving stacks")
A2=${A2:-/tmp/a2}
# Three Location audits with seeds 0-2 (docs/reproduction.md, claim 8)
CLAIM_RUNS=${CLAIM_RUNS:-"runs/audit-location-s0 runs/audit-location-s1 runs/audit-location-s2"}

skipped=()
section() {  # section NAME PATH...: true when every PATH exists; else records NAME as skipped
  local name=$1 p
  shift
  for p in "$@"; do
    if [ ! -e "$p" ]; then
      skipped+=("$name: missing $p")
      echo "skip  $name (missing $p)"
      return 1
    fi
  done
  echo "run   $name"
  [ -z "${BENCH_LIST:-}" ]
}

if section "training throughput"; then
  python benchmarks/train_throughput.py --out $R/train_throughput.json
fi
if section "runtime latency, Location" "$LOC_RUN" "$LOC_BUNDLE"; then
  python benchmarks/runtime_latency.py --run "$LOC_RUN" --bundle "$LOC_BUNDLE" --repeats 7 \
    --out $R/runtime_latency_location_fcn18-1_x6.json
fi
# Folding Linear → BatchNorm1d at export (legacy exporter; the quick Location run of docs/results.md)
if section "BatchNorm folding at export" "$A2/t"; then
  python benchmarks/export_batchnorm_fold.py --run "$A2/t" --rounds 1200 --out $R/export_batchnorm_fold.json
fi
if section "runtime latency, ResNet-56" "$CIFAR_RUN" "$CIFAR_BUNDLE"; then
  python benchmarks/runtime_latency.py --run "$CIFAR_RUN" --bundle "$CIFAR_BUNDLE" --threshold 0.9 --repeats 7 \
    --out $R/runtime_latency_cifar10_resnet56_x6.json
fi
# Serving: the README's table (the Location audit's target, inputs drawn from the real Location records)
LOCATION_DATA=${LOCATION_DATA:-../shared/data/location}
if section "serving overhead and load" "$LOC_BUNDLE" "$LOCATION_DATA"; then
  python benchmarks/serve_overhead.py --requests 2000 --modes auto,inline,thread --bundle "$LOC_BUNDLE" \
    --dataset location --data-root "$LOCATION_DATA" --out $R/serve_overhead_location.json
  python benchmarks/serve_load.py --bundle "$LOC_BUNDLE" --out $R/serve_load_location.json
fi
if section "timing defenses (TimeGuard, throughput)"; then
  python benchmarks/defense_timeguard.py --out $R/defense_timeguard.json
  python benchmarks/defense_throughput.py --seconds 3 --rounds 3 --out $R/defense_throughput.json
fi
if section "idle-gap latency" "$LOC_BUNDLE"; then
  python benchmarks/idle_gap_latency.py --bundle "$LOC_BUNDLE"
fi
if section "stealing accuracy (target-calibrated, history)" "$LOC_PLAIN_BUNDLE" "$LOC_PLAIN_RUN"; then
  python benchmarks/stealing_accuracy.py --bundle "$LOC_PLAIN_BUNDLE" --run "$LOC_PLAIN_RUN" \
    --out $R/stealing_accuracy_location.json
fi
# Adversary 2 against plain and jittery stacks, the hybrids on the saved recording, the jittery goal with the
# mirrored pacer and drift correction (docs/results.md, session 5) and its control, the decision pause, and the
# timing channel with int8 heads
if section "adversary 2 (stealing, hybrids, decision pause, int8 heads)" "$A2/t" "$A2/tb" "$A2/s" "$A2/sb"; then
  a2=(--target-bundle "$A2/tb" --target-run "$A2/t" --shadow-bundle "$A2/sb" --shadow-run "$A2/s")
  python benchmarks/adversary2_stealing.py "${a2[@]}" --kinds plain,jittery --samples 200 --repeats 10 \
    --budgets 3,5,10,20 --unpaced-budgets 5,20 --save-signals runs/a2-signals --out $R/adversary2_stealing_rec8.json
  python benchmarks/adversary2_hybrid.py --signals runs/a2-signals --out $R/adversary2_hybrid_rec8.json
  for s in 14 15 16 17; do
    for mode in final mirror_nodrift; do
      python benchmarks/adversary2_stealing.py "${a2[@]}" --kinds jittery --samples 200 --repeats 10 --budgets 20 \
        --seed $s $([ $mode = mirror_nodrift ] && echo --no-drift-correction) \
        --out $R/adversary2_stealing_${mode}_n200_s$s.json
    done
  done
  python benchmarks/decision_pause.py --target-bundle "$A2/tb" --target-run "$A2/t" --shadow-bundle "$A2/sb" \
    --out $R/decision_pause.json
  for s in 31 32 33 34 35; do
    n=$([ $s -ge 34 ] && echo 400 || echo 200)
    for m in float32 int8; do
      python benchmarks/adversary2_stealing.py "${a2[@]}" --kinds plain --samples $n --repeats 10 --budgets 2,3 \
        --seed $s $([ $m = int8 ] && echo --int8-heads) --out $R/adversary2_stealing_int8heads_${m}_n${n}_s$s.json
    done
  done
fi
# shellcheck disable=SC2086  # CLAIM_RUNS is a list of paths
if section "TimeGuard claim over three Location audits" $CLAIM_RUNS; then
  python benchmarks/timeguard_claim.py $CLAIM_RUNS --out $R/timeguard_claim_location.json
fi
# Issue 14: where a batch-1 early exit spends its time; the request path with and without numpy around the single
# graph; a batch as one graph against the per-stage chain; the chain's bookkeeping paired with session 8's loop;
# ONNX Runtime's session options and the folded mixed pools, several runtimes per version (session_variants)
if section "runtime breakdown and batch paths, Location" "$LOC_RUN" "$LOC_BUNDLE"; then
  loc=(--run "$LOC_RUN" --bundle "$LOC_BUNDLE")
  python benchmarks/runtime_breakdown.py "${loc[@]}" --repeats 7
  python benchmarks/request_path_numpy.py "${loc[@]}" --int8-heads --samples 1000
  for c in control fast_path thresholds two_runtimes; do for e in "--exit 0" ""; do
    # shellcheck disable=SC2086  # $e is one option or none
    python benchmarks/request_path_paired.py "${loc[@]}" --int8-heads --samples 1000 --compare $c $e
  done; done
  python benchmarks/batch_graph_throughput.py "${loc[@]}" --repeats 21
  python benchmarks/chain_bookkeeping.py "${loc[@]}" --repeats 31
  python benchmarks/session_variants.py "${loc[@]}" --int8-heads --runtimes 3 --pairs 1000  # ONNX Runtime's options
  python benchmarks/session_variants.py "${loc[@]}" --variants default,control,int8_heads --runtimes 6 --pairs 5000 \
    --batch 0
fi
if section "runtime breakdown and batch paths, ResNet-56" "$CIFAR_RUN" "$CIFAR_BUNDLE"; then
  cif=(--run "$CIFAR_RUN" --bundle "$CIFAR_BUNDLE" --threshold 0.9)
  python benchmarks/runtime_breakdown.py "${cif[@]}" --repeats 9
  python benchmarks/request_path_numpy.py "${cif[@]}" --int8-heads --samples 600
  for c in control fast_path thresholds two_runtimes; do for e in "--exit 0" ""; do
    # shellcheck disable=SC2086  # $e is one option or none
    python benchmarks/request_path_paired.py "${cif[@]}" --int8-heads --compare $c $e
  done; done
  python benchmarks/batch_graph_throughput.py "${cif[@]}" --repeats 7
  python benchmarks/chain_bookkeeping.py "${cif[@]}" --repeats 15
  python benchmarks/session_variants.py "${cif[@]}" --int8-heads --runtimes 3 --pairs 1000
  for h in --int8-heads ""; do for v in no_fold_pools no_blocked_handoff; do  # rewrites on by default, undone
    # shellcheck disable=SC2086  # $h is one option or none
    python benchmarks/session_variants.py "${cif[@]}" $h --variants default,control,$v --runtimes 6 --pairs 5000 \
      --batch 0
  done; done
  python benchmarks/session_variants.py "${cif[@]}" --variants default,control,int8_heads --runtimes 6 --pairs 5000 \
    --batch 0
fi
# OpenVINO as a candidate backend (`pip install openvino`; not a dependency: it lost, see docs/results.md)
if python -c "import openvino" 2>/dev/null; then
  if section "OpenVINO against ONNX Runtime" "$LOC_RUN" "$LOC_BUNDLE" "$CIFAR_RUN" "$CIFAR_BUNDLE"; then
    python benchmarks/openvino_vs_ort.py --run "$CIFAR_RUN" --bundle "$CIFAR_BUNDLE" --threshold 0.9
    python benchmarks/openvino_vs_ort.py --run "$LOC_RUN" --bundle "$LOC_BUNDLE"
  fi
else
  skipped+=("OpenVINO against ONNX Runtime: openvino not installed (pip install openvino)")
  echo "skip  OpenVINO against ONNX Runtime (openvino not installed)"
fi

if [ ${#skipped[@]} -gt 0 ]; then
  echo
  echo "${#skipped[@]} section(s) skipped; produce their inputs (docs/results.md) or point the variables at the top"
  echo "of benchmarks/run_all.sh at them:"
  printf '  %s\n' "${skipped[@]}"
  exit 1
fi

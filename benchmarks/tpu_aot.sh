#!/usr/bin/env bash
# The step compiled for TPU slices on this host, no TPU needed (benchmarks/iteration.py --memory_only --target):
# per target, SD v1.4 text-encoder AdvUnlearn in bf16 (online rollouts and the renewing bank, data parallel as
# the trainer lays them out) and a UNet method at SD 2.1 size (FSDP within a host). Each writes
# $OUT/<target>_<size>_<method>.json (memory per chip, fit, compile seconds, collectives) and the log.
# Needs libtpu, which is no requirement: run it from a venv of its own,
#   python3 -m venv tpuvenv && . tpuvenv/bin/activate && pip install "jax[tpu]==0.10.2" -r requirements.txt
#   TARGETS="v5e-8"   a subset (default: every TPU target of benchmarks/setups.py)
#   EFFORT=0          JAX's exec_time_optimization_effort (default -1: libtpu's code generation for an SD-size
#                     step takes about a fifth of the time, so the set finishes on a 2-core host; docs/scaling.md)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-benchmarks/results/tpu_aot}
mkdir -p "$out"
export JAX_PLATFORMS=cpu
for target in ${TARGETS:-v5e-8 v4-32 v5p-8 v4-8}; do
  for run in "sd14 text_encoder_full bank_renewing,online" "sd21 noxattn online"; do
    read -r size method modes <<<"$run"
    echo "== $target $size $method ($(date -u +%T))" | tee -a "$out/tpu_aot.log"
    python3 benchmarks/iteration.py --memory_only --dtype=bfloat16 --target="$target" --size="$size" \
      --method="$method" --modes="$modes" --exec_effort="${EFFORT:--1}" --json="$out/${target}_${size}_${method}.json" 2>&1 |
      grep -v "^WARNING\|^I0000\|^E0000\|libtpu_init\|Source Location\|^===\|^\$" | tee -a "$out/tpu_aot.log"
  done
done

#!/usr/bin/env bash
# The device check for one SD v1.4 AdvUnlearn iteration (random weights) on an H200, in bf16: seconds per
# iteration, sequential UNet calls, FLOP efficiency, MFU and peak memory of each x_t mode against the PyTorch
# transcription. One process per mode, each under MODE_TIMEOUT seconds (default 240), so that a mode whose
# compilation runs long leaves the others their figures: on the first H200 run (2026-11-30, jax 0.11.2) the
# batched `online` step (8 rollout buckets then, 16 slots now) was still compiling after 8 minutes. Each mode
# writes $out/iteration_h200_<dtype>_<mode>.json; the modes that finished are then joined in
# $out/iteration_h200_<dtype>.json, with their speed-ups.
# The modes share one compilation cache (XLA_CACHE, default /tmp/advunlearn_xla_cache): on a GPU it keeps XLA's
# autotuning results per fusion, so a mode does not tune again the kernels an earlier mode tuned (the attack's
# and the defender's UNet passes are common to all), nor does a rerun in the same lease; a training run shares
# its cache the same way between its two step variants and across resumes.
#   MODES="online_sequential bank"   a subset, in this order (default: all, the cheapest to compile first)
#   DTYPES="bfloat16 float32"        adds fp32
#   SIZE=sdxl                        SDXL base through both text towers, remat "dots" (configs/sdxl_nudity.py's
#                                    setting), modes "bank online" by default: no PyTorch transcription exists for
#                                    it; files named iteration_h200_sdxl_<dtype>_<mode>.json
# Carry the wheels that gpu_env.sh names, or leave pytorch out of MODES. The image's pytest runs the attention check.
set -uo pipefail
# shellcheck source=SCRIPTDIR/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
# cuDNN's fused attention against XLA's on this GPU first (seconds): every mode below runs SD's self-attention in it.
JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_attention.py 2>&1 | tail -4 |
  tee -a "$out/iteration_h200.log"
size="${SIZE:-sd14}"
modes="bank bank_renewing online_sequential pytorch online" tag="" extra=()
if [ "$size" = sdxl ]; then
  modes="bank online" tag="sdxl_" extra=(--remat=dots)
fi
for dtype in ${DTYPES:-bfloat16}; do
  for mode in ${MODES:-$modes}; do
    echo "== $size $mode $dtype ($(date -u +%T))" | tee -a "$out/iteration_h200.log"
    timeout "${MODE_TIMEOUT:-240}" python3 benchmarks/iteration.py --size="$size" --iters=2 --dtype="$dtype" \
      --modes="$mode" --json="$out/iteration_h200_${tag}${dtype}_$mode.json" "${extra[@]}" \
      --compilation_cache="${XLA_CACHE:-/tmp/advunlearn_xla_cache}" "$@" 2>&1 | tee -a "$out/iteration_h200.log"
  done
  finished=("$out/iteration_h200_${tag}${dtype}"_*.json)
  [ -e "${finished[0]}" ] && python3 benchmarks/iteration.py --merge "${finished[@]}" \
    --json="$out/iteration_h200_${tag}$dtype.json" 2>&1 | tee -a "$out/iteration_h200.log"
done

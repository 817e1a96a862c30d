#!/usr/bin/env bash
# The device check for one SD v1.4 AdvUnlearn iteration (random weights) on an H200: every x_t mode (the PyTorch
# transcription, online_sequential, online, bank, bank_renewing) in bf16, seconds per iteration, sequential UNet
# calls, FLOP efficiency, MFU and peak memory; `DTYPES="bfloat16 float32"` adds fp32 (a second 10-minute call).
# Carry the wheels that gpu_env.sh names, or pass --no_torch.
set -uo pipefail
# shellcheck source=SCRIPTDIR/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
for dtype in ${DTYPES:-bfloat16}; do
  timeout "${BENCH_TIMEOUT:-540}" python3 benchmarks/iteration.py --size=sd14 --iters=2 --dtype="$dtype" \
    --json="$out/iteration_h200_$dtype.json" "$@" 2>&1 | tee -a "$out/iteration_h200.log"
done

#!/usr/bin/env bash
# The device check for one SD v1.4 AdvUnlearn iteration (random weights) on an H200: JAX online vs bank vs the
# PyTorch transcription, fp32 then bf16. Carry the wheels that gpu_env.sh names, or pass --no_torch.
set -uo pipefail
# shellcheck source=SCRIPTDIR/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
for dtype in float32 bfloat16; do
  timeout "${BENCH_TIMEOUT:-250}" python3 benchmarks/iteration.py --size=sd14 --iters=2 --dtype="$dtype" \
    --remat=full "$@" 2>&1 | tee -a "$out/iteration_h200.log"
done

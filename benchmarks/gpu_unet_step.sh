#!/usr/bin/env bash
# The device check for the UNet benchmark on an H200, against diffusers with the same weights when the wheels
# that gpu_env.sh names were carried.
set -uo pipefail
# shellcheck source=SCRIPTDIR/gpu_env.sh
. "$(dirname "$0")/gpu_env.sh"
baseline=()
python3 -c "import diffusers" 2>/dev/null && baseline=(--torch)
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/unet_step.py --batch=1,6 --dtype=float32,bfloat16 \
  --remat=none,full --iters=5 "${baseline[@]}" --json_out="$out/unet_step_h200.json" "$@" 2>&1 |
  tee "$out/unet_step_h200.log"

#!/usr/bin/env bash
# The device check for the UNet benchmark: one H200, the image's own JAX (CUDA). Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
timeout "${BENCH_TIMEOUT:-420}" python3 benchmarks/unet_step.py --batch=1,6 --dtype=float32,bfloat16 \
  --remat=none,full --iters=5 --json_out="$out/unet_step_h200.json" 2>&1 | tee "$out/unet_step_h200.log"

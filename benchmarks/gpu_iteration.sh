#!/usr/bin/env bash
# The device check for one SD v1.4 AdvUnlearn iteration (random weights) on an H200, JAX online vs bank vs the
# PyTorch transcription. The image has JAX (CUDA), flax, optax, torch and transformers but not diffusers or
# openai-clip: carry their wheels (pure Python) first, from the repo root on the dev machine:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps -d .whl diffusers==0.42.1 openai-clip==1.0.1 ml-collections==1.1.0 ftfy
# then run with carry=[".whl"]. Without them, pass --no_torch to skip the PyTorch baseline.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-/tmp}"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for dtype in float32 bfloat16; do
  timeout "${BENCH_TIMEOUT:-250}" python3 benchmarks/iteration.py --size=sd14 --iters=2 --dtype="$dtype" \
    --remat=full "$@" 2>&1 | tee -a "$out/iteration_h200.log"
done

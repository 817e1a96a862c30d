# Sourced by the gpu_*.sh device checks: unbuffered output, no preallocation (so peaks are real), the results
# folder, and diffusers + friends from carried wheels. The H200 image has JAX (CUDA), flax, optax, torch and
# transformers but not diffusers or openai-clip; carry their wheels (pure Python), from the repo root here:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps -d .whl diffusers==0.42.1 ml-collections==1.1.0 ftfy wcwidth importlib_metadata \
#     tensorboardX==2.6.5
#   pip wheel --no-deps -w .whl openai-clip==1.0.1   # published as a source archive only
# then run with carry=[".whl"]. The image's own JAX and flax are used (jax 0.11.2, flax 0.12.10 on 2026-11-30).
# shellcheck shell=bash
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
out="${OUT:-/tmp}"
export out
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

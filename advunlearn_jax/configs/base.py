"""The reference AdvUnlearn defaults (spec sections 2-4) on Stable Diffusion v1.4.

  python -m advunlearn_jax.main --config=configs/base.py --workdir=workdirs/base \
      --config.model.pretrained=CompVis/stable-diffusion-v1-4
"""

from advunlearn_jax import config_lib


def get_config():
  return config_lib.base_config()

"""Tiny random Flax models (no torch) for trainer tests: a CLIP text tower and an SD-shaped UNet."""

from __future__ import annotations

import functools

import jax

from advunlearn_jax.diffusion.schedule import ScheduleConfig
from advunlearn_jax.models import clip_text
from advunlearn_jax.models import unet as unet_lib

CLIP = clip_text.CLIPTextConfig(
  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
)
UNET = unet_lib.UNetConfig(
  block_out_channels=(32, 32),
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  layers_per_block=1,
  num_attention_heads=(4, 4),
  cross_attention_dim=32,
  norm_num_groups=8,
  sample_size=8,
)
SCHEDULE = ScheduleConfig()


@functools.cache
def params(seed: int = 0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  clip = clip_text.init_params(CLIP, k1)
  import jax.numpy as jnp

  unet = jax.jit(unet_lib.UNet2DConditionModel(UNET).init)(
    k2, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 32))
  )["params"]
  return clip, unet

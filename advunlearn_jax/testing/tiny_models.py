"""Tiny random Flax models (no torch) for tests and benchmarks: a CLIP text tower and an SD-shaped UNet at the
benchmarks' sizes, and a whole diffusers folder of them."""

from __future__ import annotations

import functools

import jax

from advunlearn_jax.models import clip_text, presets
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models.pipeline_record import ScheduleConfig

SIZES = ("micro", "tiny", "small", "sd14", "sd21")


def configs(size: str) -> tuple[clip_text.CLIPTextConfig, unet_lib.UNetConfig]:
  """SD v1.4's CLIP-L and UNet (`sd14`), SD 2.1's OpenCLIP-H text tower and 768-px UNet (`sd21`), or CPU-sized
  ones: `small` (8x8 latents, 32 channels, SD's block types: where a batched UNet call costs less per row on a
  CPU), `tiny` (16x16 latents, 32/64 channels) and `micro`, the tests' models: `small` with one resolution level
  (one cross-attention block down and up, the mid block between), because compiling training steps is most of
  the suites' time (README); two-level UNets with every block type are checked against diffusers and the
  reference in tests/test_unet_vae.py, test_diffusion.py and test_reference_parity.py."""
  if size == "sd14":
    return clip_text.CLIPTextConfig(), unet_lib.UNetConfig.from_dict(presets.SD14_UNET)
  if size == "sd21":
    return clip_text.CLIPTextConfig(**presets.SD2_TEXT), unet_lib.UNetConfig.from_dict(presets.SD21_UNET)
  clip = clip_text.CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
  )
  levels = 1 if size == "micro" else 2  # micro: small's first down block, its last up block, the mid block
  unet = unet_lib.UNetConfig(
    block_out_channels=((32, 64) if size == "tiny" else (32, 32))[:levels],
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")[:levels],
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")[-levels:],
    layers_per_block=1,
    num_attention_heads=(4, 4)[:levels],
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16 if size == "tiny" else 8,
  )
  return clip, unet


CLIP, UNET = configs("micro")  # the tests' random models
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


def write_pipeline(out_dir: str, seed: int = 0) -> str:
  """A complete tiny diffusers folder (random weights) written with our own exporters."""
  import jax.numpy as jnp

  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.data import tokenizer as tok_lib
  from advunlearn_jax.models import vae as vae_lib

  vae_config = vae_lib.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16)
  vae_params = jax.jit(vae_lib.AutoencoderKL(vae_config).init)(jax.random.key(seed + 1), jnp.zeros((1, 16, 16, 3)))
  clip, unet = params(seed)
  return sd_convert.write_pipeline(
    out_dir,
    unet=(UNET, unet),
    vae=(vae_config, vae_params["params"]),
    text_encoder=(CLIP, clip),
    tokenizer_dir=tok_lib.offline_tokenizer_folder(),
    schedule=SCHEDULE,
  )

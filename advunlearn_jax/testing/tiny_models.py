"""Tiny random Flax models (no torch) for tests and benchmarks: a CLIP text tower and an SD-shaped UNet at the
benchmarks' sizes, and a whole diffusers folder of them; the same for SDXL at one micro size (`micro_sdxl`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.models import clip_text, presets
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models import vae as vae_lib
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
SDXL_SCHEDULE = ScheduleConfig(clip_sample=False)  # SDXL base's scheduler config: SD's betas, no x0 clipping


@functools.cache
def params(seed: int = 0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  clip = clip_text.init_params(CLIP, k1)
  unet = jax.jit(unet_lib.UNet2DConditionModel(UNET).init)(
    k2, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 32))
  )["params"]
  return clip, unet


def write_pipeline(out_dir: str, seed: int = 0) -> str:
  """A complete tiny diffusers folder (random weights) written with our own exporters."""
  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.data import tokenizer as tok_lib

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


# `micro_sdxl`, SDXL base's layout at test size. Tower 1 in CLIP-L's shape (quick_gelu), tower 2 in OpenCLIP bigG's
# (gelu, bos 0, pad 1, a projection); both with the legacy eos_token_id 2, as SDXL base's configs.
MICRO_SDXL_TEXT = clip_text.CLIPTextConfig(
  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32, eos_token_id=2
)
MICRO_SDXL_TEXT_2 = clip_text.CLIPTextConfig(
  **{
    **presets.SDXL_TEXT_2,
    **dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, projection_dim=32),
  }
)
MICRO_SDXL_IDS, MICRO_SDXL_ID_DIM = 6, 8  # original (h, w), crop (top, left), target (h, w); channels per id
# No attention at the top level, per-block transformer depth (the mid block takes the last), linear projections,
# per-block head counts, the text_time embedding of tower 2's text_embeds and the ids; the towers' states
# concatenate to cross_attention_dim.
MICRO_SDXL_UNET = dict(
  sample_size=16,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
  transformer_layers_per_block=(1, 2),
  attention_head_dim=(2, 4),
  cross_attention_dim=MICRO_SDXL_TEXT.hidden_size + MICRO_SDXL_TEXT_2.hidden_size,
  use_linear_projection=True,
  addition_embed_type="text_time",
  addition_time_embed_dim=MICRO_SDXL_ID_DIM,
  projection_class_embeddings_input_dim=MICRO_SDXL_TEXT_2.projection_dim + MICRO_SDXL_IDS * MICRO_SDXL_ID_DIM,
  norm_num_groups=8,
)


def micro_sdxl() -> tuple[clip_text.CLIPTextConfig, clip_text.CLIPTextConfig, unet_lib.UNetConfig, vae_lib.VAEConfig]:
  """(tower 1, tower 2, UNet, VAE) configs of `micro_sdxl`: 16x16 latents, 32x32 images, SDXL's VAE scaling."""
  vae = vae_lib.VAEConfig(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.13025
  )
  unet = unet_lib.UNetConfig.from_dict(MICRO_SDXL_UNET, source="micro_sdxl")
  return MICRO_SDXL_TEXT, MICRO_SDXL_TEXT_2, unet, vae


def random_params(abstract: Any, seed: int) -> Any:
  """Random params of `abstract`'s shapes, drawn on the host: a Flax `init` compiles the model's whole forward
  pass, tens of seconds per SDXL-shaped model on a loaded 2-core CPU. Kernels and embeddings ~ N(0, 1/fan_in),
  norm scales 1 + N(0, 0.1^2), biases N(0, 0.02^2): none zero or one, so a transposed, swapped or dropped
  parameter shows in a parity test."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "bias":
      value = 0.02 * rng.standard_normal(leaf.shape)
    else:  # kernel [in, out] / [kh, kw, in, out], embedding [vocab, dim]
      fan_in = leaf.shape[-1] if name == "embedding" else int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.cache
def sdxl_params(seed: int = 0):
  """Random (tower 1, tower 2, UNet, VAE) params of `micro_sdxl`."""
  text, text_2, unet, vae = micro_sdxl()
  abstract = (
    clip_text.abstract_params(text),
    clip_text.abstract_params(text_2, with_projection=True),
    unet_lib.abstract_params(unet),
    vae_lib.abstract_params(vae),
  )
  return tuple(random_params(a, seed * 4 + i) for i, a in enumerate(abstract))


def write_sdxl_pipeline(out_dir: str, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> str:
  """A complete micro SDXL diffusers folder (random weights) written with our own exporters; tokenizer_2/ pads
  with "!" as SDXL base's does."""
  import tempfile

  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.data import tokenizer as tok_lib

  text, text_2, unet, vae = micro_sdxl()
  text_params, text_params_2, unet_params, vae_params = sdxl_params(seed)
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer_2 = tok_lib.write_clip_tokenizer_folder(f"{tmp}/tokenizer_2", pad_token="!")
    return sd_convert.write_sdxl_pipeline(
      out_dir,
      unet=(unet, unet_params),
      vae=(vae, vae_params),
      text_encoder=(text, text_params),
      text_encoder_2=(text_2, text_params_2),
      tokenizer_dir=tok_lib.offline_tokenizer_folder(),
      tokenizer_2_dir=tokenizer_2,
      schedule=SDXL_SCHEDULE,
      force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )

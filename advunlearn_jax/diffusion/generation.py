"""Text-to-image generation with our Flax pipelines: encode prompts, denoise with CFG, decode, save PNGs.

An SD 1.x/2.x `Pipeline` conditions on one array, an `SDXLPipeline` on an `SDXLCond` pytree
(diffusion/sdxl_conditioning.py); past the encoding both take the same path."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import sampling, sdxl_conditioning
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.clip_text import encode_ids
from advunlearn_jax.models.pipeline_record import Pipeline, SDXLPipeline
from advunlearn_jax.models.unet import UNet2DConditionModel, apply_conditioned
from advunlearn_jax.models.vae import AutoencoderKL


def encode_prompts(pipe: Pipeline | SDXLPipeline, prompts: Sequence[str], text_params: Any = None) -> Any:
  """The UNet's conditioning for `prompts` under the pipeline's (or the given) text encoder: last hidden states
  [B, 77, D]; for SDXL an `SDXLCond` (`text_params` then a pair, tower 1's and tower 2's, either None)."""
  if isinstance(pipe, SDXLPipeline):
    return sdxl_conditioning.encode_prompts(pipe, prompts, text_params)
  ids = tok_lib.tokenize(tok_lib.load_tokenizer(pipe.tokenizer_dir), prompts)
  params = pipe.text_params if text_params is None else text_params
  return encode_ids(pipe.text_config, params, jnp.asarray(ids))


def unconditional(pipe: Pipeline | SDXLPipeline, n: int, text_params: Any = None) -> Any:
  """CFG's unconditional branch for `n` rows: "" under the prompts' encoder (the reference's evaluation uses the
  unlearned encoder for both), or SDXL's zeros where its folder forces them."""
  if isinstance(pipe, SDXLPipeline):
    return sdxl_conditioning.unconditional(pipe, n, text_params)
  return encode_prompts(pipe, [""] * n, text_params)


LATENT_SOURCES = ("jax", "torch")


def check_latent_source(source: str, key: str) -> None:
  if source not in LATENT_SOURCES:
    raise ConfigError(f"config.{key} is {source!r}; expected one of {list(LATENT_SOURCES)}")
  if source == "torch" and importlib.util.find_spec("torch") is None:
    raise ConfigError(f"config.{key}=torch draws the start latents with torch: pip install torch==2.13.0")


def initial_latents(pipe: Pipeline | SDXLPipeline, n: int, seed: int, source: str = "jax") -> jax.Array:
  """[n, h, w, c] start latents from `seed`. `source="torch"`: `torch.manual_seed(seed); torch.randn(n, c, h, w)`
  on the CPU generator, as the official UnlearnDiffAtk and AdvUnlearn scripts draw them, so outcomes can be
  compared prompt by prompt (the pipeline then scales them by the scheduler's initial sigma, as theirs does)."""
  hw, channels = pipe.unet_config.sample_size, pipe.unet_config.in_channels
  if source == "torch":
    import torch

    x = torch.randn((n, channels, hw, hw), generator=torch.Generator().manual_seed(seed)).numpy()
    return jnp.asarray(x.transpose(0, 2, 3, 1))
  return jax.random.normal(jax.random.key(seed), (n, hw, hw, channels), jnp.float32)


def denoise_latents(
  pipe: Pipeline | SDXLPipeline,
  cond: Any,
  uncond: Any,
  latents: jax.Array,
  *,
  scheduler: str = "lms",
  steps: int = 50,
  guidance: float = 7.5,
  progress: bool = False,
) -> jax.Array:
  tables = sampling.make_tables(scheduler, pipe.schedule, steps)
  args = {"unet": pipe.unet_params, "cond": cond, "uncond": uncond, "guidance": jnp.float32(guidance)}
  guided = float(guidance) > 1.0  # diffusers skips the unconditional branch at 1 and below
  return sampling.sample(tables, latents, _denoiser(pipe.unet_config, guided), args, progress=progress)


@functools.cache
def _denoiser(unet_config, guided: bool):
  """The same function object per (UNet config, CFG or not), so the sampler's compiled step is reused: the scale
  is an argument, so a prompt set with a guidance per prompt (I2P's, UnlearnDiffAtk's CSVs) compiles once."""
  unet = UNet2DConditionModel(unet_config)

  def denoise(args, x, t):
    unet_fn = lambda xx, tt, cc: apply_conditioned(unet, args["unet"], xx, tt, cc)
    if not guided:
      return unet_fn(x, jnp.broadcast_to(t, (x.shape[0],)), args["cond"])
    return sampling.cfg_eps(unet_fn, x, t, args["cond"], args["uncond"], args["guidance"])

  return denoise


@functools.partial(jax.jit, static_argnums=0)
def _decode(config, params, latents):
  vae = AutoencoderKL(config)
  return vae.apply({"params": params}, latents / config.scaling_factor, method=vae.decode)


@functools.partial(jax.jit, static_argnums=0)
def encode_means(config, params, images: jax.Array) -> jax.Array:
  """VAE posterior means (unscaled) of images in [-1, 1]; compiled once per VAE config and batch shape."""
  vae = AutoencoderKL(config)
  return vae.apply({"params": params}, images, method=vae.encode)[0]


@functools.partial(jax.jit, static_argnums=0)
def encode_posteriors(config, params, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """VAE posterior (mean, std), unscaled, of images in [-1, 1]: diffusers' `latent_dist` to sample from."""
  vae = AutoencoderKL(config)
  mean, logvar = vae.apply({"params": params}, images, method=vae.encode)
  return mean, jnp.exp(0.5 * logvar)


def encode_images(pipe: Pipeline | SDXLPipeline, images: np.ndarray) -> jax.Array:
  """uint8 images [B, H, W, 3] -> latents scaled as the UNet sees them (the inverse of `decode_images`)."""
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  return encode_means(pipe.vae_config, pipe.vae_params, x) * pipe.vae_config.scaling_factor


@functools.partial(jax.jit, static_argnums=0)
def decode_uint8(config, params, latents: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] on device (sharded like `latents`), post-processed exactly as diffusers' pipelines do."""
  images = jnp.clip(_decode(config, params, latents) / 2 + 0.5, 0.0, 1.0)
  return (images * 255).round().astype(jnp.uint8)


def image_size(pipe: Pipeline | SDXLPipeline) -> int:
  """The side of decoded images: the UNet's latent side times the VAE's downsampling (SD 1.x: 64 * 8)."""
  return pipe.unet_config.sample_size * 2 ** (len(pipe.vae_config.block_out_channels) - 1)


def decode_images(pipe: Pipeline | SDXLPipeline, latents: jax.Array) -> np.ndarray:
  return np.asarray(decode_uint8(pipe.vae_config, pipe.vae_params, latents))


def generate(
  pipe: Pipeline | SDXLPipeline,
  prompts: Sequence[str],
  latents: jax.Array,
  *,
  text_params: Any = None,
  scheduler: str = "lms",
  steps: int = 50,
  guidance: float = 7.5,
  progress: bool = False,
) -> np.ndarray:
  """Images for `prompts` from NHWC `latents`, with `unconditional`'s branch for CFG."""
  cond = encode_prompts(pipe, prompts, text_params)
  uncond = unconditional(pipe, len(prompts), text_params)
  out = denoise_latents(
    pipe, cond, uncond, latents, scheduler=scheduler, steps=steps, guidance=guidance, progress=progress
  )
  return decode_images(pipe, out)


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  grid = np.full((rows * h, cols * w, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, cols)
    grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)

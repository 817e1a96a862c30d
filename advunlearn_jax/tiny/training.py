"""Trains the tiny world's models from scratch and writes them where the repo ships them.

  python -m advunlearn_jax.tiny.build --out=advunlearn_jax/assets                  (the command: tiny/build.py)
  python -m advunlearn_jax.tiny.build --layout=sdxl --out=advunlearn_jax/assets

writes `tiny_sd/` (a diffusers StableDiffusionPipeline folder, written with our exporters) and `judge/`; with
`--layout=sdxl`, `tiny_sdxl/` (a StableDiffusionXLPipeline folder: two text towers, the text_time UNet) on the
SD build's judge and VAE. Everything is seeded; on 2 CPU cores the whole build takes the time printed at its end
(see the README). Order: render a pool of images -> judge -> VAE -> latents of the pool -> the text tower(s) and
UNet together.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advunlearn_jax import config_lib, time_left
from advunlearn_jax.convert import clip_text as clip_text_convert
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import generation, sdxl_conditioning
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import clip_text, presets
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models import vae as vae_lib
from advunlearn_jax.models.pipeline_record import ScheduleConfig
from advunlearn_jax.models.unet import AddedCond, SDXLCond
from advunlearn_jax.tiny import judge as judge_lib
from advunlearn_jax.tiny import world

# Factor-4 VAE: 32x32x3 images <-> 8x8x4 latents.
VAE = vae_lib.VAEConfig(
  block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32
)
# The real CLIP vocabulary and tokenizer; width and depth cut to what three-attribute captions need. At width 32
# the tower lost the shape when a style word came first ("a striped red square" drew circles).
CLIP = clip_text.CLIPTextConfig(
  hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, projection_dim=64
)
UNET = unet_lib.UNetConfig(
  block_out_channels=(32, 64),
  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
  layers_per_block=1,
  num_attention_heads=(4, 4),
  cross_attention_dim=64,
  norm_num_groups=16,
  sample_size=8,
)
SCHEDULE = ScheduleConfig(clip_sample=False)

# The SDXL-layout world (tiny_sdxl/): SDXL base's layout (models/presets.py) at the tiny world's widths. Tower 1 in
# CLIP-L's shape, tower 2 in OpenCLIP bigG's (gelu, a projection, tokenizer_2 padding with "!"), both read at
# their penultimate layer; no attention at the top level, per-block transformer depth, linear projections, and
# the text_time embedding of tower 2's pooled output with the six micro-conditioning ids. Same VAE as tiny_sd.
SDXL_TEXT = dataclasses.replace(CLIP, eos_token_id=2)
SDXL_TEXT_2 = clip_text.CLIPTextConfig(
  **{
    **presets.SDXL_TEXT_2,
    **{k: getattr(CLIP, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
    "projection_dim": CLIP.projection_dim,
  }
)
_SDXL_IDS, _SDXL_ID_DIM = 6, 16  # original (h, w), crop (top, left), target (h, w); channels per id
SDXL_UNET = unet_lib.UNetConfig.from_dict(
  dict(
    sample_size=UNET.sample_size,
    block_out_channels=UNET.block_out_channels,
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(4, 4),  # diffusers' name for SDXL's head counts
    cross_attention_dim=SDXL_TEXT.hidden_size + SDXL_TEXT_2.hidden_size,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=_SDXL_ID_DIM,
    projection_class_embeddings_input_dim=SDXL_TEXT_2.projection_dim + _SDXL_IDS * _SDXL_ID_DIM,
    norm_num_groups=UNET.norm_num_groups,
  ),
  source="tiny_sdxl",
)


_CAPTION_DROP = 0.1  # empty prompts, so classifier-free guidance has an unconditional model to push from
_KL_WEIGHT = 1e-5


def render_pool(seed: int, n: int, chunk: int = 1024) -> tuple[np.ndarray, world.Attributes]:
  images, attrs = [], []
  for i in range(0, n, chunk):
    x, a, _ = world.batch(seed, i // chunk, min(chunk, n - i))
    images.append(x)
    attrs.append(np.stack(a, -1))
  a = np.concatenate(attrs)
  return np.concatenate(images), world.Attributes(a[:, 0], a[:, 1], a[:, 2])


def _adam(lr: float, steps: int) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(500, steps // 10), steps, end_value=lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))


def train_vae(images: np.ndarray, *, steps: int, seed: int, batch: int = 32) -> tuple[vae_lib.VAEConfig, Any]:
  model = vae_lib.AutoencoderKL(VAE)
  params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))["params"]
  tx = _adam(2e-3, steps)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, key):
    def loss_fn(p):
      mean, logvar = model.apply({"params": p}, x, method=model.encode)
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
      recon = model.apply({"params": p}, z, method=model.decode)
      kl = 0.5 * jnp.mean(jnp.sum(mean**2 + jnp.exp(logvar) - 1 - logvar, axis=(1, 2, 3)))
      err = recon - x
      return jnp.mean(jnp.abs(err)) + jnp.mean(err**2) + _KL_WEIGHT * kl, jnp.mean(jnp.abs(err))

    (loss, l1), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, l1

  rng = np.random.default_rng([seed, 1])
  eta = time_left.Eta(steps)
  for i in range(steps):
    idx = rng.integers(len(images), size=batch)
    params, opt_state, l1 = step(params, opt_state, images[idx], jax.random.key(i))
    if i % 500 == 0 or i == steps - 1:
      print(f"vae step {i + 1}/{steps}: L1 {float(l1):.4f}, {eta(i + 1)}", flush=True)
  mean = encode_means(VAE, params, images[:4096])
  config = dataclasses.replace(VAE, scaling_factor=float(1.0 / np.std(mean)))
  return config, params


def encode_means(config: vae_lib.VAEConfig, params: Any, images: np.ndarray, chunk: int = 512) -> np.ndarray:
  chunks = range(0, len(images), chunk)
  return np.concatenate([np.asarray(generation.encode_means(config, params, images[i : i + chunk])) for i in chunks])


class CaptionIds:
  """Token ids of captions drawn afresh for every batch; the tokenizer is slow, the caption space small."""

  def __init__(self, tokenizer_dir: str | None = None):
    self._tokenizer = tok_lib.load_tokenizer(tokenizer_dir or tok_lib.offline_tokenizer_folder())

  @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per build
  def ids(self, text: str) -> np.ndarray:
    return tok_lib.tokenize(self._tokenizer, [text])[0]

  def batch(self, texts: list[str]) -> np.ndarray:
    return np.stack([self.ids(t) for t in texts])


def captions(attrs: world.Attributes, idx: np.ndarray, rng: np.random.Generator) -> list[str]:
  """One caption per drawn image, "" for a dropped one."""
  return [
    "" if rng.random() < _CAPTION_DROP else world.caption(attrs.shape[i], attrs.color[i], attrs.style[i], rng)
    for i in idx
  ]


def _fit_denoiser(
  params: dict,
  condition: Any,
  unet_config: unet_lib.UNetConfig,
  latents: np.ndarray,
  attrs: world.Attributes,
  batch_inputs: Any,
  *,
  steps: int,
  seed: int,
  batch: int,
  lr: float,
) -> dict:
  """The epsilon objective on {"text": ..., "unet": ...} params; `condition(text_params, inputs)` turns one batch's
  `batch_inputs(texts)` into the UNet's conditioning. Returns the EMA params."""
  unet = unet_lib.UNet2DConditionModel(unet_config)
  tx = _adam(lr, steps)
  opt_state = tx.init(params)
  ema = params
  ac = jnp.asarray(SCHEDULE.alphas_cumprod_diffusers(), jnp.float32)

  @jax.jit
  def step(params, opt_state, ema, x0, inputs, key, decay):
    k_t, k_n = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, SCHEDULE.num_train_timesteps)
    noise = jax.random.normal(k_n, x0.shape)
    a = ac[t][:, None, None, None]
    xt = jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise

    def loss_fn(p):
      cond = condition(p["text"], inputs)
      return jnp.mean((unet_lib.apply_conditioned(unet, p["unet"], xt, t, cond) - noise) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    return params, opt_state, ema, loss

  rng = np.random.default_rng([seed, 2])
  t0, running, eta = time.perf_counter(), [], time_left.Eta(steps)
  for i in range(steps):
    idx = rng.integers(len(latents), size=batch)
    inputs = batch_inputs(captions(attrs, idx, rng))
    decay = min(0.999, (1 + i) / (10 + i))  # warm-up, so the EMA forgets the random init
    params, opt_state, ema, loss = step(params, opt_state, ema, latents[idx], inputs, jax.random.key(i), decay)
    running.append(loss)
    if i % 500 == 0 or i == steps - 1:
      loss = float(np.mean(jax.device_get(running)))
      print(f"sd step {i + 1}/{steps}: loss {loss:.4f} ({time.perf_counter() - t0:.0f}s, {eta(i + 1)})", flush=True)
      running = []
  return ema


def train_sd(
  latents: np.ndarray,
  attrs: world.Attributes,
  *,
  steps: int,
  seed: int,
  batch: int,
  lr: float = 1e-3,
  init: tuple[Any, Any] | None = None,
  train_text: bool = True,
) -> tuple[Any, Any]:
  """CLIP text tower and UNet with the epsilon objective, from scratch or from `init` = (text, unet) params;
  returns EMA params (text, unet). `train_text=False` fine-tunes the UNet under a frozen text tower (the
  tiny world's stand-in for SD v1.5: a UNet that a text encoder trained on the base model plugs into)."""
  text = clip_text.CLIPTextModel(CLIP)
  if init is None:
    k_text, k_unet = jax.random.split(jax.random.key(seed + 2))
    x, t, ctx = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, CLIP.hidden_size))
    unet_init = jax.jit(unet_lib.UNet2DConditionModel(UNET).init)(k_unet, x, t, ctx)["params"]
    init = (clip_text.init_params(CLIP, k_text), unet_init)

  def condition(text_params, ids):
    text_params = text_params if train_text else jax.lax.stop_gradient(text_params)  # zero grads: Adam leaves it
    return text.apply({"params": text_params}, ids).last_hidden_state

  ids = CaptionIds()
  params = {"text": init[0], "unet": init[1]}
  kw = dict(steps=steps, seed=seed, batch=batch, lr=lr)
  ema = _fit_denoiser(params, condition, UNET, latents, attrs, ids.batch, **kw)
  return ema["text"], ema["unet"]


def train_sdxl(
  latents: np.ndarray,
  attrs: world.Attributes,
  *,
  steps: int,
  seed: int,
  batch: int,
  tokenizer_2_dir: str,
  lr: float = 1e-3,
  init: tuple[Any, Any, Any] | None = None,
) -> tuple[Any, Any, Any]:
  """Both SDXL-layout towers and the text_time UNet with the epsilon objective, conditioned as
  `StableDiffusionXLPipeline` conditions (sdxl_conditioning.py: the towers' penultimate states concatenated,
  tower 2's text_embeds and the pipeline's default time ids). A dropped caption is all zeros, context and pooled,
  which is what the pipeline's unconditional branch feeds under force_zeros_for_empty_prompt. Returns EMA params
  (tower 1, tower 2, UNet)."""
  if init is None:
    keys = jax.random.split(jax.random.key(seed + 2), 3)
    init = (
      clip_text.init_params(SDXL_TEXT, keys[0]),
      clip_text.init_params(SDXL_TEXT_2, keys[1], with_projection=True),
      _random_unet(SDXL_UNET, keys[2]),
    )
  tokens, tokens_2 = CaptionIds(), CaptionIds(tokenizer_2_dir)

  def batch_inputs(texts):
    return tokens.batch(texts), tokens_2.batch(texts), np.asarray([t != "" for t in texts], np.float32)

  params = {"text": init[:2], "unet": init[2]}
  kw = dict(steps=steps, seed=seed, batch=batch, lr=lr)
  ema = _fit_denoiser(params, caption_condition, SDXL_UNET, latents, attrs, batch_inputs, **kw)
  return (*ema["text"], ema["unet"])


def caption_condition(text_params: tuple[Any, Any], inputs: tuple[Any, Any, Any]) -> SDXLCond:
  """What `train_sdxl` conditions the UNet on for a batch of (ids, tokenizer 2's ids, kept [B] 0/1): the pipeline's
  encoding of each caption, and its unconditional zeros for a dropped one; the pipeline's default time ids."""
  ids, ids_2, keep = inputs
  context, pooled = sdxl_conditioning.encode_ids(SDXL_TEXT, SDXL_TEXT_2, *text_params, ids, ids_2)
  size = sdxl_conditioning.default_size(SDXL_UNET, VAE)  # original and target size; crop (0, 0)
  time_ids = jnp.broadcast_to(jnp.asarray([*size, 0, 0, *size], jnp.float32), (ids.shape[0], _SDXL_IDS))
  return SDXLCond(context * keep[:, None, None], AddedCond(pooled * keep[:, None], time_ids))


def _random_unet(config: unet_lib.UNetConfig, key: jax.Array) -> Any:
  unet = unet_lib.UNet2DConditionModel(config)
  x, t = jnp.zeros((1, config.sample_size, config.sample_size, 4)), jnp.zeros((1,), jnp.int32)
  ctx = jnp.zeros((1, 77, config.cross_attention_dim))
  width = config.projection_class_embeddings_input_dim
  added = AddedCond(jnp.zeros((1, width - _SDXL_IDS * _SDXL_ID_DIM)), jnp.zeros((1, _SDXL_IDS)))
  return jax.jit(unet.init)(key, x, t, ctx, added)["params"]


def _check_stage(stage: int, continue_from: str) -> float:
  """ConfigError unless stage 1 builds from scratch and a later one continues a folder; the build's start time."""
  if (stage > 1) != bool(continue_from):
    raise ConfigError(
      f"--stage={stage} with --continue_from={continue_from!r}: stage 1 builds from scratch, later stages "
      "continue from the previous stage's folder"
    )
  return time.perf_counter()


def build(
  out: str,
  *,
  seed: int,
  pool: int,
  judge_steps: int,
  vae_steps: int,
  sd_steps: int,
  sd_batch: int,
  sd_lr: float = 1e-3,
  continue_from: str = "",
  stage: int = 1,
) -> dict:
  times, t = {}, _check_stage(stage, continue_from)
  images, attrs = render_pool(seed, pool)
  held_images, held_attrs = render_pool(seed + 1000, 2048)
  times["render"] = time.perf_counter() - t

  t = time.perf_counter()
  if continue_from:  # a second stage: same pool, earlier judge and VAE, more text tower + UNet training
    judge_config, judge_params = judge_lib.load(os.path.join(continue_from, "judge"))
    vae_config, vae_params = sd_convert.load_vae(os.path.join(continue_from, "tiny_sd", "vae"))
    _, init_text = clip_text_convert.load_clip_text(os.path.join(continue_from, "tiny_sd", "text_encoder"))
    _, init_unet = sd_convert.load_unet(os.path.join(continue_from, "tiny_sd", "unet"))
    init, seed = (init_text, init_unet), seed + 100 * (stage - 1)  # each stage draws fresh batches and noise
  else:
    judge_config, judge_params = judge_lib.train(images, attrs, steps=judge_steps, seed=seed)
    vae_config, vae_params = train_vae(images, steps=vae_steps, seed=seed)
    init = None
  judge_acc = judge_lib.accuracy(judge_config, judge_params, held_images, held_attrs)
  print(f"judge held-out accuracy: {judge_acc}")
  judge_lib.save(os.path.join(out, "judge"), judge_config, judge_params, {"held_out_accuracy": judge_acc})
  latents = encode_means(vae_config, vae_params, images) * vae_config.scaling_factor
  times["judge_vae"] = time.perf_counter() - t

  t = time.perf_counter()
  text_params, unet_params = train_sd(latents, attrs, steps=sd_steps, seed=seed, batch=sd_batch, lr=sd_lr, init=init)
  times["text_unet"] = time.perf_counter() - t
  sd_convert.write_pipeline(
    os.path.join(out, "tiny_sd"),
    unet=(UNET, unet_params),
    vae=(vae_config, vae_params),
    text_encoder=(CLIP, text_params),
    tokenizer_dir=tok_lib.offline_tokenizer_folder(),
    schedule=SCHEDULE,
  )
  print("build times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
  return {"judge_accuracy": judge_acc, "seconds": times}


def build_sdxl(
  out: str,
  *,
  seed: int,
  pool: int,
  sd_steps: int,
  sd_batch: int,
  sd_lr: float = 1e-3,
  continue_from: str = "",
  stage: int = 1,
  assets: str = "",
) -> dict:
  """`tiny_sdxl/` on the SD build's VAE (read from `assets`/tiny_sd, or the previous stage's tiny_sdxl): the same
  pool's latents, both towers and the SDXL-layout UNet; the judge stays the SD build's (it judges images)."""
  times, t = {}, _check_stage(stage, continue_from)
  images, attrs = render_pool(seed, pool)
  times["render"] = time.perf_counter() - t
  t = time.perf_counter()
  if continue_from:
    previous = sd_convert.load_sdxl_pipeline(os.path.join(continue_from, "tiny_sdxl"))
    vae_config, vae_params = previous.vae_config, previous.vae_params
    init, seed = (previous.text_params, previous.text_params_2, previous.unet_params), seed + 100 * (stage - 1)
  else:
    assets = assets or os.path.dirname(config_lib.TINY_MODEL_DIR)  # read at use, as convert/diffusers.py reads it
    vae_config, vae_params = sd_convert.load_vae(os.path.join(assets, "tiny_sd", "vae"))
    init = None
  latents = encode_means(vae_config, vae_params, images) * vae_config.scaling_factor
  times["latents"] = time.perf_counter() - t
  t = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer_2 = tok_lib.write_clip_tokenizer_folder(os.path.join(tmp, "tokenizer_2"), pad_token="!")
    text, text_2, unet = train_sdxl(
      latents, attrs, steps=sd_steps, seed=seed, batch=sd_batch, lr=sd_lr, init=init, tokenizer_2_dir=tokenizer_2
    )
    times["text_unet"] = time.perf_counter() - t
    sd_convert.write_sdxl_pipeline(
      os.path.join(out, "tiny_sdxl"),
      unet=(SDXL_UNET, unet),
      vae=(vae_config, vae_params),
      text_encoder=(SDXL_TEXT, text),
      text_encoder_2=(SDXL_TEXT_2, text_2),
      tokenizer_dir=tok_lib.offline_tokenizer_folder(),
      tokenizer_2_dir=tokenizer_2,
      schedule=SCHEDULE,
    )
  print("build times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
  return {"seconds": times}

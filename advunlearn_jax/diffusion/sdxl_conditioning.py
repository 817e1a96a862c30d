"""SDXL's UNet conditioning, built as diffusers' `StableDiffusionXLPipeline` builds it (diffusers 0.42,
pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py): `encode_prompt` for the text, `_get_add_time_ids`
and the defaults of `__call__` for the micro-conditioning ids.

* context: each tower's penultimate hidden state (`hidden_states[-2]`, clip_skip None), tower 1's then tower 2's,
  concatenated on the feature axis; each tower reads its own tokenizer's ids (SDXL base's tokenizer_2 pads with
  "!", not with EOT);
* pooled: tower 2's `text_embeds` (the projected pooled output);
* time ids: original size (h, w), crop top-left (top, left), target size (h, w); sizes default to the UNet's
  sample size times the VAE's downsampling (8 without a VAE, as diffusers), the crop to (0, 0);
* the unconditional branch: zeros for the context and the pooled embeddings where the folder's model_index.json
  says `force_zeros_for_empty_prompt` (SDXL base does), otherwise "" through both towers; the same time ids.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from advunlearn_jax.models.pipeline_record import SDXLPipeline
from advunlearn_jax.models.unet import AddedCond, SDXLCond, UNetConfig
from advunlearn_jax.models.vae import VAEConfig


def image_size(pipe: SDXLPipeline) -> tuple[int, int]:
  """(height, width) the pipeline draws by default: `default_sample_size * vae_scale_factor`."""
  return default_size(pipe.unet_config, pipe.vae_config)


def default_size(unet_config: UNetConfig, vae_config: VAEConfig | None) -> tuple[int, int]:
  """`image_size` from the configs alone (8 without a VAE, as diffusers)."""
  factor = 2 ** (len(vae_config.block_out_channels) - 1) if vae_config is not None else 8
  side = unet_config.sample_size * factor
  return side, side


def time_ids(
  pipe: SDXLPipeline,
  n: int,
  original_size: tuple[int, int] | None = None,
  crops_coords_top_left: tuple[int, int] = (0, 0),
  target_size: tuple[int, int] | None = None,
) -> jax.Array:
  """[n, 6] float32 micro-conditioning ids, one identical row per image."""
  row = time_id_row(pipe, original_size, crops_coords_top_left, target_size)
  return jnp.tile(jnp.asarray([row], jnp.float32), (n, 1))


def time_id_row(
  pipe: SDXLPipeline,
  original_size: tuple[int, int] | None = None,
  crops_coords_top_left: tuple[int, int] = (0, 0),
  target_size: tuple[int, int] | None = None,
) -> tuple[float, ...]:
  """`time_ids`' row on the host: (original h, w, crop top, left, target h, w), diffusers' defaults."""
  size = image_size(pipe)
  return tuple(float(v) for v in (*(original_size or size), *crops_coords_top_left, *(target_size or size)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def encode_ids(
  config: CLIPTextConfig, config_2: CLIPTextConfig, params: Any, params_2: Any, ids: jax.Array, ids_2: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """(context [B, T, D1 + D2], pooled [B, P]) of both towers' token ids."""
  out = CLIPTextModel(config).apply({"params": params}, ids)
  out_2 = CLIPTextModelWithProjection(config_2).apply({"params": params_2}, ids_2)
  context = jnp.concatenate([out.penultimate_hidden_state, out_2.penultimate_hidden_state], axis=-1)
  return context, out_2.text_embeds


def encode_words(
  tower: nn.Module,
  tower_2: nn.Module,
  params: Any,
  params_2: Any,
  words: jax.Array,
  words_2: jax.Array,
  eot: jax.Array,
  pad_id_2: int,
  time_id_row: tuple[float, ...],
) -> SDXLCond:
  """The conditioning of word embeddings [B, T, D1] and [B, T, D2] (tower 1's and tower 2's rows of one typed id
  sequence, possibly edited: soft or learned tokens), `eot` [B] each row's first EOT position. Tower 2 reads
  tokenizer 2's pad row after the EOT and pools there, as the pipeline's tokenizer_2 ids make it do."""
  pos = jnp.arange(words_2.shape[-2])[None]
  after = (pos > eot[:, None])[..., None]
  pad = params_2["text_model"]["embeddings"]["token_embedding"]["embedding"][pad_id_2]
  # Ids whose only EOT is at `eot`: they choose tower 2's pooled position, as the pipeline's ids do.
  eos = max(tower_2.config.eos_token_id, 1)
  ids = jnp.where(pos == eot[:, None], eos, 0).astype(jnp.int32)
  out = tower.apply({"params": params}, inputs_embeds=words)
  out_2 = tower_2.apply({"params": params_2}, ids, inputs_embeds=jnp.where(after, pad, words_2))
  context = jnp.concatenate([out.penultimate_hidden_state, out_2.penultimate_hidden_state], axis=-1)
  time_ids = jnp.broadcast_to(jnp.asarray(time_id_row, jnp.float32), (eot.shape[0], len(time_id_row)))
  return SDXLCond(context, AddedCond(out_2.text_embeds, time_ids))


def _params(pipe: SDXLPipeline, text_params: tuple[Any, Any] | dict | None) -> tuple[Any, Any]:
  """The towers' params: the pipeline's, or (tower 1, tower 2) given, either None for the pipeline's, or the
  training step's tree ({"text_encoder": ..., "text_encoder_2": ...}, SDXLPipeline.text_tree)."""
  if isinstance(text_params, dict) and set(text_params) == {"text_encoder", "text_encoder_2"}:
    text_params = (text_params["text_encoder"], text_params["text_encoder_2"])
  given = (None, None) if text_params is None else text_params
  if not isinstance(given, tuple | list) or len(given) != 2:
    raise ValueError("an SDXL pipeline's text_params are a pair (tower 1's, tower 2's), either None for the pipeline's")
  return (
    pipe.text_params if given[0] is None else given[0],
    pipe.text_params_2 if given[1] is None else given[1],
  )


def encode_prompts(
  pipe: SDXLPipeline,
  prompts: Sequence[str],
  text_params: tuple[Any, Any] | None = None,
  **sizes: Any,
) -> SDXLCond:
  """The UNet's conditioning for `prompts`; `sizes` are `time_ids`' keywords (diffusers' defaults)."""
  ids = tok_lib.tokenize(tok_lib.load_tokenizer(pipe.tokenizer_dir), prompts)
  ids_2 = tok_lib.tokenize(tok_lib.load_tokenizer(pipe.tokenizer_2_dir), prompts)
  params, params_2 = _params(pipe, text_params)
  context, pooled = encode_ids(
    pipe.text_config, pipe.text_config_2, params, params_2, jnp.asarray(ids), jnp.asarray(ids_2)
  )
  return SDXLCond(context, AddedCond(pooled, time_ids(pipe, len(prompts), **sizes)))


def unconditional(pipe: SDXLPipeline, n: int, text_params: tuple[Any, Any] | None = None, **sizes: Any) -> SDXLCond:
  """CFG's unconditional branch for `n` rows (no negative prompt): zeros where the pipeline forces them, else ""."""
  if not pipe.force_zeros_for_empty_prompt:
    return encode_prompts(pipe, [""] * n, text_params, **sizes)
  width = pipe.text_config.hidden_size + pipe.text_config_2.hidden_size
  context = jnp.zeros((n, tok_lib.MAX_LENGTH, width), jnp.float32)
  pooled = jnp.zeros((n, pipe.text_config_2.projection_dim), jnp.float32)
  return SDXLCond(context, AddedCond(pooled, time_ids(pipe, n, **sizes)))

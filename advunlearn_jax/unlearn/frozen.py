"""Everything a step reads but never changes: original weights, the prompts' frozen encodings and layouts."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import ddim, sdxl_conditioning
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.clip_text import CLIPTextConfig, encode_ids
from advunlearn_jax.models.pipeline_record import ScheduleConfig, SDXLPipeline
from advunlearn_jax.models.unet import AddedCond, SDXLCond
from advunlearn_jax.unlearn import cond_tree, prompts
from advunlearn_jax.unlearn.step import Frozen


def encode_in_chunks(config, params, ids: np.ndarray, chunk: int = 32) -> jax.Array:
  """E_o of many prompts, `chunk` at a time (bounded memory at CLIP-L size)."""
  return jnp.concatenate(
    [encode_ids(config, params, jnp.asarray(ids[i : i + chunk])) for i in range(0, len(ids), chunk)]
  )


def build(
  *,
  clip_config: CLIPTextConfig,
  clip_params: Any,
  unet_params: Any,
  tokenizer,
  concepts: Sequence[str],
  retain_prompts: Sequence[str],
  attack_type: str,
  num_tokens: int,
  faithful_word_split: bool,
  schedule: ScheduleConfig,
  words: Sequence[str] = (),
  ddim_steps: int = 50,
  concept_latents: np.ndarray | None = None,
  encode: Callable[[np.ndarray], Any] | None = None,
  uncond: Any = None,
) -> tuple[Frozen, int]:
  """The Frozen pytree and k (for `add`, the longest concept's length, so one delta shape serves all).

  `encode(ids) -> conditioning` of tokenizer 1's ids, and `uncond` (E_o(""), unbatched): SDXL's (`sdxl_encoder`);
  None: the text encoder's last hidden state, of "" for uncond."""
  if encode is None:
    encode = functools.partial(encode_in_chunks, clip_config, clip_params)
  concepts = [str(c).strip() for c in concepts]
  if not concepts or any(not c for c in concepts):
    raise ConfigError("config.concept.prompts: needs at least one non-empty concept")
  for concept in concepts:
    full = len(tokenizer(concept)["input_ids"]) - 2
    if full > 75:
      raise ConfigError(f"config.concept.prompts: {concept[:40]!r}... has {full} tokens; at most 75 fit in CLIP's 77")
  concept_ids = tok_lib.tokenize(tokenizer, concepts)
  retain_ids = tok_lib.tokenize(tokenizer, list(retain_prompts))
  word_index, delta_index, k = layout_maps(tokenizer, concepts, attack_type, num_tokens, faithful_word_split, words)
  if uncond is None:
    uncond = encode(tok_lib.tokenize(tokenizer, [""]))[0]
  frozen = Frozen(
    unet=unet_params,
    clip=clip_params,
    emb_uncond=uncond,
    concept_ids=jnp.asarray(concept_ids),
    concept_emb=encode(concept_ids),
    word_index=jnp.asarray(word_index),
    delta_index=jnp.asarray(delta_index),
    retain_ids=jnp.asarray(retain_ids),
    retain_emb=encode(retain_ids),
    tables=ddim.ldm_tables(schedule.alphas_cumprod_ldm(), ddim_steps),
  )
  if concept_latents is not None:  # attack.objective inversion/both: noised as CCE's diffusers scheduler does
    alphas = jnp.asarray(schedule.alphas_cumprod_diffusers(), jnp.float32)
    frozen = frozen._replace(concept_latents=jnp.asarray(concept_latents, jnp.float32), alphas_cumprod=alphas)
  return frozen, k


def tower_2_ids(ids: np.ndarray, pad_id_2: int) -> np.ndarray:
  """Tokenizer 2's ids from tokenizer 1's: the same tokens, `pad_id_2` after the first EOT (SDXL base's tokenizer_2
  pads with "!"); the step builds tower 2's sequences the same way (step._encode)."""
  ids = np.asarray(ids)
  after = np.arange(ids.shape[-1])[None] > np.argmax(ids == tok_lib.EOT_ID, axis=-1)[:, None]
  return np.where(after, pad_id_2, ids)


def sdxl_encoder(pipe: SDXLPipeline, tokenizer_2, pad_id_2: int, chunk: int = 32):
  """(encode, uncond) for `build` on an SDXL pipeline: the conditioning sdxl_conditioning builds (both towers'
  penultimate states, tower 2's text_embeds, the pipeline's default time ids), from tokenizer 1's ids, checked
  against tokenizer 2's own ids so that the step's tower-2 sequences are the pipeline's."""

  def encode(ids: np.ndarray) -> SDXLCond:
    ids_2 = tower_2_ids(ids, pad_id_2)
    parts = []
    for i in range(0, len(ids), chunk):
      parts.append(
        sdxl_conditioning.encode_ids(
          pipe.text_config,
          pipe.text_config_2,
          pipe.text_params,
          pipe.text_params_2,
          jnp.asarray(ids[i : i + chunk]),
          jnp.asarray(ids_2[i : i + chunk]),
        )
      )
    context, pooled = (jnp.concatenate(p) for p in zip(*parts))
    return SDXLCond(context, AddedCond(pooled, sdxl_conditioning.time_ids(pipe, len(ids))))

  return encode, cond_tree.take(sdxl_conditioning.unconditional(pipe, 1), 0)


def check_tower_2_ids(tokenizer, tokenizer_2, prompts: Sequence[str], pad_id_2: int) -> None:
  """Tokenizer 2 must read every prompt as tokenizer 1 does but for its padding: one adversarial layout then
  serves both towers."""
  ids = tok_lib.tokenize(tokenizer, list(prompts))
  if not np.array_equal(tower_2_ids(ids, pad_id_2), tok_lib.tokenize(tokenizer_2, list(prompts))):
    raise ConfigError(
      "model.pretrained: the SDXL folder's tokenizer_2 splits the concept or retain prompts differently from "
      "tokenizer/ (beyond its padding), so one adversarial prompt cannot lay out on both towers"
    )


def layout_maps(
  tokenizer, concepts: Sequence[str], attack_type: str, num_tokens: int, faithful_word_split: bool, words: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, int]:
  """(word_index [C, 77], delta_index [C, 77], k): each concept prompt's layout (unlearn/prompts.py)."""
  word_place = attack_type == "word_k"  # in the words' place: BPE tokens, the reference's word split is no layout's
  lengths, spans = [], []
  for concept, ids in zip(concepts, tok_lib.tokenize(tokenizer, list(concepts))):
    lengths.append(prompts.concept_length(ids, concept, tok_lib.EOT_ID, faithful_word_split and not word_place))
    spans.append(prompts.word_spans(tokenizer, concept, words) if word_place else [])  # checked: config_validation
  k = max(lengths) if attack_type == "add" else num_tokens
  layouts = [prompts.layout(attack_type, n, k, s) for n, s in zip(lengths, spans)]
  return np.stack([lay.word_index for lay in layouts]), np.stack([lay.delta_index for lay in layouts]), k


def store_for_compute(frozen: Frozen, models) -> Frozen:
  """`frozen` with the UNet's kernels (ndim >= 2) in the UNet's compute dtype when no UNet leaf is trained (the
  text-encoder methods). That UNet is only read, by Dense and Conv modules that cast their kernels to the compute
  dtype anyway: storing them cast changes no value and halves their memory in bf16 (SD v1.4: 3.4 -> 1.7 GB on
  every device). Norm scales and biases, which some modules read in fp32, keep their precision. UNet methods keep
  fp32: their master weights start from these leaves."""
  dtype = jnp.dtype(models.unet.dtype)
  if dtype == jnp.float32 or models.trained.tower == "unet":
    return frozen
  return frozen._replace(unet=_kernels_cast(frozen.unet, dtype))


# One compiled program for the whole tree: cast eagerly, SD v1.4's 282 kernels took 40 programs (one per distinct
# shape) and 19 s of a 2-core CPU, against 1.7 s.
@functools.partial(jax.jit, static_argnames="dtype")
def _kernels_cast(unet: Any, dtype: jnp.dtype) -> Any:
  return jax.tree.map(lambda p: p.astype(dtype) if p.ndim >= 2 else p, unet)

"""A pipeline's text side as the robustness attacks edit it (evals/unlearndiff.py, evals/inversion.py): token ids
-> word embeddings -> the UNet's conditioning, the word embeddings open to edit in between (soft tokens, learned
embeddings).

SD 1.x/2.x: the one tower's rows, its last hidden state. SDXL: one typed id sequence read by both towers, as
`StableDiffusionXLPipeline` reads a prompt (tokenizer_2 shares tokenizer's vocabulary and BPE; only its padding
after the first EOT differs), so an edited position is a row in each tower's table: word embeddings, tables and
learned rows are pairs (tower 1's, tower 2's), the conditioning sdxl_conditioning's. This is the training step's
reading of an SDXL prompt too (unlearn/step.py SDXLText): the attacker evaluated is the one trained against.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import sdxl_conditioning
from advunlearn_jax.models import clip_text
from advunlearn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from advunlearn_jax.models.pipeline_record import Pipeline, SDXLPipeline
from advunlearn_jax.models.unet import AddedCond, SDXLCond


class TextSide(NamedTuple):
  """Hashable (a key of the attacks' compiled functions): the towers' configs and, for SDXL, tokenizer 2's pad id
  and the pipeline's micro-conditioning row."""

  config: CLIPTextConfig
  config_2: CLIPTextConfig | None = None  # SDXL's tower 2 (a CLIPTextModelWithProjection)
  pad_id_2: int = 0
  time_id_row: tuple[float, ...] = ()

  @classmethod
  def of(cls, pipe: Pipeline | SDXLPipeline) -> TextSide:
    if isinstance(pipe, SDXLPipeline):
      pad_id_2 = tok_lib.load_tokenizer(pipe.tokenizer_2_dir).pad_token_id
      return cls(pipe.text_config, pipe.text_config_2, pad_id_2, sdxl_conditioning.time_id_row(pipe))
    return cls(pipe.text_config)

  @property
  def is_sdxl(self) -> bool:
    return self.config_2 is not None

  @property
  def widths(self) -> tuple[int, ...]:
    """The towers' word-embedding widths: one learned or soft token is a row of each."""
    configs = (self.config, self.config_2) if self.is_sdxl else (self.config,)
    return tuple(c.hidden_size for c in configs)

  @staticmethod
  def params(pipe: Pipeline | SDXLPipeline) -> Any:
    """The pipeline's text params as the attacks (and the training step) hold them."""
    return pipe.text_tree

  def tables(self, params: Any) -> Any:
    """[V, D] token embeddings; SDXL: the pair."""
    if not self.is_sdxl:
      return params["embeddings"]["token_embedding"]["embedding"]
    return (
      params["text_encoder"]["embeddings"]["token_embedding"]["embedding"],
      params["text_encoder_2"]["text_model"]["embeddings"]["token_embedding"]["embedding"],
    )

  def words(self, params: Any, ids: jax.Array) -> Any:
    """Word embeddings [..., T, D] of token ids (tokenizer 1's); SDXL: the pair."""
    return jax.tree.map(lambda table: table[ids], self.tables(params))

  def encode(self, params: Any, words: Any, ids: jax.Array) -> Any:
    """The UNet's conditioning of word embeddings [B, T, D] (or the SDXL pair) that stand for token ids [B, T]:
    the ids only place the EOT (tower 2's pooled position and padding)."""
    if not self.is_sdxl:
      return CLIPTextModel(self.config).apply({"params": params}, inputs_embeds=words).last_hidden_state
    return sdxl_conditioning.encode_words(
      CLIPTextModel(self.config),
      CLIPTextModelWithProjection(self.config_2),
      params["text_encoder"],
      params["text_encoder_2"],
      *words,
      jnp.argmax(ids == tok_lib.EOT_ID, axis=-1),
      self.pad_id_2,
      self.time_id_row,
    )

  def encode_ids(self, params: Any, ids: np.ndarray) -> Any:
    """The conditioning of token ids [B, T] (tokenizer 1's), as the pipeline encodes a prompt of those ids."""
    if not self.is_sdxl:
      return clip_text.encode_ids(self.config, params, jnp.asarray(ids))
    return _encode_sdxl_ids(self, params, jnp.asarray(ids))


@functools.partial(jax.jit, static_argnums=0)
def _encode_sdxl_ids(side: TextSide, params: Any, ids: jax.Array) -> SDXLCond:
  """tokenizer_2's ids are tokenizer 1's with its pad id after the first EOT; then sdxl_conditioning.encode_ids."""
  pos = jnp.arange(ids.shape[-1])[None]
  ids_2 = jnp.where(pos > jnp.argmax(ids == tok_lib.EOT_ID, axis=-1)[:, None], side.pad_id_2, ids)
  context, pooled = sdxl_conditioning.encode_ids(
    side.config, side.config_2, params["text_encoder"], params["text_encoder_2"], ids, ids_2
  )
  time_ids = jnp.broadcast_to(jnp.asarray(side.time_id_row, jnp.float32), (ids.shape[0], len(side.time_id_row)))
  return SDXLCond(context, AddedCond(pooled, time_ids))

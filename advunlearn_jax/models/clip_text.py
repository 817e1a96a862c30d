"""CLIP text transformer in Flax Linen, configured from the `config.json` that transformers writes.

This is the module AdvUnlearn trains. Parameter names mirror transformers' `CLIPTextModel`
(`encoder.layers.3.self_attn.q_proj` becomes `encoder/layers_3/self_attn/q_proj`), so conversion is a
mechanical rule (see `convert/clip_text.py`). SDXL conditions on two towers: each one's penultimate hidden state
(before the final layer norm), and the second's projected pooled output (`CLIPTextModelWithProjection`).

Two entry points, because the attacker and the defender both feed word embeddings:
  * `model.apply(params, input_ids)`;
  * `model.apply(params, inputs_embeds=E, input_ids=ids)`: E are word embeddings *before* position embeddings
    (e.g. `one_hot(ids) @ token_embedding`, or a sequence holding adversarial rows). `input_ids` then only
    choose the pooled (EOT) position, exactly as in the reference's `CustomTextEncoder`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import hf_config

# transformers' ACT2FN names -> JAX functions. `gelu` is the exact (erf) GELU, as in PyTorch.
ACTIVATIONS = {
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

# transformers configs written before PR #24773 carry eos_token_id == 2; for those the pooled position is
# argmax(input_ids) (EOT has the largest id), otherwise it is the first position holding eos_token_id.
_LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' `CLIPTextConfig` that define the text tower."""

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 768
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1

  def __post_init__(self):
    self.validate()

  def validate(self) -> None:
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f"key 'hidden_act' is {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
    for name in (
      "vocab_size",
      "hidden_size",
      "intermediate_size",
      "num_hidden_layers",
      "num_attention_heads",
      "max_position_embeddings",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"key {name!r} must be a positive integer, got {value!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(
        f"key 'hidden_size' ({self.hidden_size}) must be divisible by "
        f"'num_attention_heads' ({self.num_attention_heads})"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config") -> CLIPTextConfig:
    """Builds from a transformers config dict (a `CLIPTextConfig`, or a `CLIPConfig` with `text_config`)."""
    if "text_config" in raw and isinstance(raw["text_config"], dict):
      raw = raw["text_config"]
    known = {f.name for f in dataclasses.fields(cls)}
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in raw]
    if missing:
      raise ConfigError(f"{source}: missing key(s) {missing}; is this a CLIP text model config?")
    kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
    try:
      return cls(**kwargs)
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None

  @classmethod
  def from_json_file(cls, path: str) -> CLIPTextConfig:
    raw, path = hf_config.read(path, "config.json", "a transformers CLIPTextModel folder")
    return cls.from_dict(raw, source=path)

  def to_transformers_dict(self, architecture: str = "CLIPTextModel") -> dict[str, Any]:
    """The config.json that `transformers.<architecture>.from_pretrained` reads (4.x and 5.x)."""
    return {
      "architectures": [architecture],
      "model_type": "clip_text_model",
      **dataclasses.asdict(self),
      "attention_dropout": 0.0,
      "dropout": 0.0,
      "initializer_factor": 1.0,
      "initializer_range": 0.02,
      "torch_dtype": "float32",
    }


class CLIPTextOutput(NamedTuple):
  last_hidden_state: jax.Array  # [B, T, D], the UNet conditioning of SD 1.x/2.x.
  pooled_output: jax.Array | None  # [B, D] at the EOT position; None when no ids were given.
  # [B, T, D]: transformers' `hidden_states[-2]`, the output of the last layer but one, without the final layer
  # norm: what SDXL's pipeline takes from both towers. Free under jit when unused.
  penultimate_hidden_state: jax.Array | None = None
  text_embeds: jax.Array | None = None  # [B, P]: pooled_output @ text_projection (CLIPTextModelWithProjection)


class CLIPAttention(nn.Module):
  config: CLIPTextConfig  # or a CLIPVisionConfig: the encoder blocks only read the shared fields
  dtype: Any = jnp.float32
  causal: bool = True  # the text tower; the vision tower attends both ways

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dense = lambda name: nn.Dense(cfg.hidden_size, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(*t.shape[:-1], cfg.num_attention_heads, cfg.head_dim)
    q, k, v = (split(dense(n)(x)) for n in ("q_proj", "k_proj", "v_proj"))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal, scale=cfg.head_dim**-0.5)
    return dense("out_proj")(out.reshape(*x.shape[:-1], cfg.hidden_size))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = nn.Dense(cfg.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = ACTIVATIONS[cfg.hidden_act](x)
    return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  causal: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    eps = self.config.layer_norm_eps
    h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm1")(x)
    x = x + CLIPAttention(self.config, self.dtype, self.causal, name="self_attn")(h)
    h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm2")(x)
    return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig
  dtype: Any = jnp.float32
  causal: bool = True

  def setup(self):
    n = self.config.num_hidden_layers
    self.layers = [CLIPEncoderLayer(self.config, self.dtype, self.causal) for _ in range(n)]

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.hidden_states(x)[-1]

  def hidden_states(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """transformers' `hidden_states`: the input, then every layer's output."""
    states = (x,)
    for layer in self.layers:
      states += (layer(states[-1]),)
    return states


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig

  def setup(self):
    cfg = self.config
    self.token_embedding = nn.Embed(cfg.vocab_size, cfg.hidden_size)
    self.position_embedding = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size)

  def __call__(self, inputs_embeds: jax.Array) -> jax.Array:
    seq_len = inputs_embeds.shape[-2]
    if seq_len > self.config.max_position_embeddings:
      raise ValueError(
        f"sequence length {seq_len} exceeds max_position_embeddings {self.config.max_position_embeddings}"
      )
    return inputs_embeds + self.position_embedding.embedding[:seq_len]

  def word_embeddings(self, input_ids: jax.Array) -> jax.Array:
    return self.token_embedding(input_ids)


class CLIPTextModel(nn.Module):
  """transformers' `CLIPTextModel` (no projection head): SD 1.x CLIP-L and SD 2.x OpenCLIP-H text towers."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32

  def setup(self):
    self.embeddings = CLIPTextEmbeddings(self.config)
    self.encoder = CLIPEncoder(self.config, self.dtype)
    self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype)

  def __call__(
    self,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
  ) -> CLIPTextOutput:
    if inputs_embeds is None:
      if input_ids is None:
        raise ValueError("CLIPTextModel needs input_ids or inputs_embeds")
      inputs_embeds = self.embeddings.word_embeddings(input_ids)
    states = self.encoder.hidden_states(self.embeddings(inputs_embeds).astype(self.dtype))
    x = self.final_layer_norm(states[-1])
    pooled = None
    if input_ids is not None:
      pooled = jnp.take_along_axis(x, self.eot_positions(input_ids)[:, None, None], axis=1)[:, 0]
    return CLIPTextOutput(last_hidden_state=x, pooled_output=pooled, penultimate_hidden_state=states[-2])

  def word_embeddings(self, input_ids: jax.Array) -> jax.Array:
    """Token-embedding rows (before position embeddings): the space the attack optimises in."""
    return self.embeddings.word_embeddings(input_ids)

  def eot_positions(self, input_ids: jax.Array) -> jax.Array:
    if self.config.eos_token_id == _LEGACY_EOS_TOKEN_ID:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)


class CLIPTextModelWithProjection(nn.Module):
  """transformers' `CLIPTextModelWithProjection`: SDXL's second tower (OpenCLIP bigG). Same calls as
  CLIPTextModel; `text_embeds` is set where ids give the pooled position."""

  config: CLIPTextConfig
  dtype: Any = jnp.float32

  def setup(self):
    self.text_model = CLIPTextModel(self.config, self.dtype)
    self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

  def __call__(
    self,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
  ) -> CLIPTextOutput:
    out = self.text_model(input_ids, inputs_embeds=inputs_embeds)
    if out.pooled_output is None:
      return out
    return out._replace(text_embeds=self.text_projection(out.pooled_output))

  def word_embeddings(self, input_ids: jax.Array) -> jax.Array:
    return self.text_model.word_embeddings(input_ids)


def text_tower(config: CLIPTextConfig, with_projection: bool = False, dtype: Any = jnp.float32) -> nn.Module:
  return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config, dtype)


@functools.partial(jax.jit, static_argnums=0)
def encode_ids(config: CLIPTextConfig, params: Any, ids: jax.Array) -> jax.Array:
  """Last hidden states [B, T, D] of token ids: the UNet conditioning of whole prompts."""
  return CLIPTextModel(config).apply({"params": params}, ids).last_hidden_state


def abstract_params(config: CLIPTextConfig, seq_len: int | None = None, with_projection: bool = False) -> Any:
  """Parameter shapes and dtypes without allocating them (`jax.eval_shape`)."""
  seq_len = seq_len or config.max_position_embeddings
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  return jax.eval_shape(text_tower(config, with_projection).init, jax.random.key(0), ids)["params"]


def init_params(config: CLIPTextConfig, rng: jax.Array, with_projection: bool = False) -> Any:
  ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
  return jax.jit(text_tower(config, with_projection).init)(rng, ids)["params"]

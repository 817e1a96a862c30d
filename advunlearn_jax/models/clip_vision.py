"""CLIP's vision tower and the two-tower `CLIPModel` in Flax, for the CLIP score (spec 6.2: ViT-B/32).

Parameter names mirror transformers' `CLIPModel` (`vision_model.encoder.layers.0...`, `visual_projection`),
so `convert/clip_model.py` maps weights with the same mechanical rule as the text tower. The encoder blocks
are the text tower's, run without the causal mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.clip_text import ACTIVATIONS, CLIPEncoder, CLIPTextConfig, CLIPTextModel


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The fields of transformers' `CLIPVisionConfig` that define the vision tower (defaults: ViT-B/32)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f"vision_config key 'hidden_act' is {self.hidden_act!r}; supported: {sorted(ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads or self.image_size % self.patch_size:
      raise ConfigError(
        f"vision_config: hidden_size {self.hidden_size} must divide by num_attention_heads "
        f"{self.num_attention_heads}, image_size {self.image_size} by patch_size {self.patch_size}"
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_positions(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPModelConfig:
  text: CLIPTextConfig
  vision: CLIPVisionConfig
  projection_dim: int = 512

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "config") -> CLIPModelConfig:
    if not isinstance(raw.get("text_config"), dict) or not isinstance(raw.get("vision_config"), dict):
      raise ConfigError(f"{source}: needs 'text_config' and 'vision_config'; is this a transformers CLIPModel?")
    known = {f.name for f in dataclasses.fields(CLIPVisionConfig)}
    try:
      vision = CLIPVisionConfig(**{k: v for k, v in raw["vision_config"].items() if k in known and v is not None})
    except ConfigError as e:
      raise ConfigError(f"{source}: {e}") from None
    text = CLIPTextConfig.from_dict(raw["text_config"], source=source)
    return cls(text, vision, int(raw.get("projection_dim", 512)))


class CLIPVisionEmbeddings(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    cfg = self.config
    p = cfg.patch_size
    patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                      name="patch_embedding")(pixels)  # fmt: skip
    patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)  # row-major, as torch's flatten(2)
    # A bare [D] nn.Parameter in torch; a one-row Embed here, so the weight-name rule stays mechanical
    # (convert/clip_model.py renames and reshapes that one key).
    cls = nn.Embed(1, cfg.hidden_size, name="class_embedding").embedding
    cls = jnp.broadcast_to(cls.astype(patches.dtype), (patches.shape[0], 1, cfg.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + nn.Embed(cfg.num_positions, cfg.hidden_size, name="position_embedding").embedding.astype(x.dtype)


class CLIPVisionTransformer(nn.Module):
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels: jax.Array) -> jax.Array:
    """NHWC normalised pixels -> pooled [B, D] (post-layernormed CLS token)."""
    eps = self.config.layer_norm_eps
    x = CLIPVisionEmbeddings(self.config, self.dtype, name="embeddings")(pixels)
    x = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="pre_layrnorm")(x)  # sic: transformers' spelling
    x = CLIPEncoder(self.config, self.dtype, causal=False, name="encoder")(x)
    return nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
  config: CLIPModelConfig

  def setup(self):
    cfg = self.config
    self.text_model = CLIPTextModel(cfg.text)
    self.vision_model = CLIPVisionTransformer(cfg.vision)
    self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False)
    self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False)

  def __call__(self, input_ids: jax.Array, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.text_features(input_ids), self.image_features(pixels)

  def text_features(self, input_ids: jax.Array) -> jax.Array:
    return self.text_projection(self.text_model(input_ids).pooled_output)

  def image_features(self, pixels: jax.Array) -> jax.Array:
    return self.visual_projection(self.vision_model(pixels))


def abstract_params(config: CLIPModelConfig) -> Any:
  ids = jax.ShapeDtypeStruct((1, config.text.max_position_embeddings), jnp.int32)
  pixels = jax.ShapeDtypeStruct((1, config.vision.image_size, config.vision.image_size, 3), jnp.float32)
  return jax.eval_shape(CLIPModel(config).init, jax.random.key(0), ids, pixels)["params"]

"""AutoencoderKL (Stable Diffusion's VAE) in Flax Linen, configured from a diffusers `vae/config.json`.

Images are NHWC in [-1, 1]; latents NHWC. `encode` returns the posterior mean and log-variance, `decode`
maps latents back to images; `scaling_factor` (0.18215 for SD 1.x) is applied by the callers that move
between the VAE and diffusion spaces (`latents = mean * scaling_factor`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import hf_config
from advunlearn_jax.models.attention import dot_product_attention
from advunlearn_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv

_EPS = 1e-6  # every VAE GroupNorm


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  sample_size: int = 512

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "vae config") -> VAEConfig:
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
      for t in raw.get(key, ()):
        if t != allowed:
          raise ConfigError(f"{source}: key {key!r} holds unsupported block type {t!r}; supported: [{allowed!r}]")
    if raw.get("act_fn", "silu") != "silu":
      raise ConfigError(f"{source}: key 'act_fn' = {raw['act_fn']!r} is not supported (only 'silu')")
    if raw.get("shift_factor") not in (None, 0, 0.0):
      raise ConfigError(f"{source}: key 'shift_factor' = {raw['shift_factor']!r} is not supported (SD 1.x/2.x: None)")
    if "block_out_channels" not in raw:
      raise ConfigError(f"{source}: key 'block_out_channels' is missing; is this a diffusers AutoencoderKL config?")
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in known and v is not None}
    return cls(**kwargs)

  @classmethod
  def from_json_file(cls, path: str) -> VAEConfig:
    raw, path = hf_config.read(path, "config.json", "a diffusers vae/ folder")
    return cls.from_dict(raw, source=path)

  def to_diffusers_dict(self) -> dict[str, Any]:
    n = len(self.block_out_channels)
    return {
      "_class_name": "AutoencoderKL",
      **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()},
      "down_block_types": ["DownEncoderBlock2D"] * n,
      "up_block_types": ["UpDecoderBlock2D"] * n,
      "act_fn": "silu",
    }


class SpatialAttention(nn.Module):
  """The VAE mid-block's single-head self-attention over pixels, with its own GroupNorm and a residual."""

  channels: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    q, k, v = (dense(n)(y)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
    y = dot_product_attention(q, k, v)[:, :, 0, :]
    return x + dense("to_out_0")(y).reshape(b, h, w, c)


class MidBlock(nn.Module):
  channels: int
  groups: int
  add_attention: bool
  dtype: Any = jnp.float32

  def setup(self):
    self.resnets = [ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype) for _ in range(2)]
    if self.add_attention:
      self.attentions = [SpatialAttention(self.channels, self.groups, self.dtype)]

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.add_attention:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class EncoderBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  downsample: bool
  dtype: Any = jnp.float32

  def setup(self):
    self.resnets = [ResnetBlock2D(self.out_channels, self.groups, _EPS, self.dtype) for _ in range(self.num_layers)]
    if self.downsample:
      self.downsamplers = [Downsample2D(self.out_channels, padding=0, dtype=self.dtype)]

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsamplers[0](x) if self.downsample else x


class DecoderBlock(nn.Module):
  out_channels: int
  num_layers: int
  groups: int
  upsample: bool
  dtype: Any = jnp.float32

  def setup(self):
    self.resnets = [ResnetBlock2D(self.out_channels, self.groups, _EPS, self.dtype) for _ in range(self.num_layers)]
    if self.upsample:
      self.upsamplers = [Upsample2D(self.out_channels, self.dtype)]

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.upsamplers[0](x) if self.upsample else x


class Encoder(nn.Module):
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    x = conv(ch[0], dtype=self.dtype, name="conv_in")(x)
    for i, c in enumerate(ch):
      x = EncoderBlock(c, cfg.layers_per_block, g, i < len(ch) - 1, self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(ch[-1], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(nn.GroupNorm(g, epsilon=_EPS, dtype=self.dtype, name="conv_norm_out")(x))
    return conv(2 * cfg.latent_channels, dtype=self.dtype, name="conv_out")(x)


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    ch, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
    x = conv(ch[0], dtype=self.dtype, name="conv_in")(z)
    x = MidBlock(ch[0], g, cfg.mid_block_add_attention, self.dtype, name="mid_block")(x)
    for i, c in enumerate(ch):
      x = DecoderBlock(c, cfg.layers_per_block + 1, g, i < len(ch) - 1, self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(nn.GroupNorm(g, epsilon=_EPS, dtype=self.dtype, name="conv_norm_out")(x))
    return conv(cfg.out_channels, dtype=self.dtype, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype)
    self.decoder = Decoder(cfg, self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = conv(2 * cfg.latent_channels, kernel=1, dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = conv(cfg.latent_channels, kernel=1, dtype=self.dtype)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Images [B, H, W, 3] in [-1, 1] -> posterior (mean, logvar), each [B, H/f, W/f, latent_channels]."""
    moments = self.encoder(images.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    z = latents.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.decode(self.encode(images)[0])


LIST_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out")
# Names of diffusers' deprecated VAE attention blocks (e.g. the SD v1.4 hub VAE) -> current names.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def abstract_params(config: VAEConfig) -> Any:
  images = jax.ShapeDtypeStruct((1, 16, 16, config.in_channels), jnp.float32)
  return jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), images)["params"]

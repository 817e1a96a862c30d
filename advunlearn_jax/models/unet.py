"""Stable Diffusion's UNet2DConditionModel in Flax Linen, configured from a diffusers `unet/config.json`.

Covers the SD 1.x layout (conv projections, one head count for every block), the SD 2.x variants (linear
projections, per-block head counts) and SDXL's (no attention at the top level, per-block transformer depth, and
the `text_time` added embedding: pooled text embeddings and micro-conditioning ids added to the time embedding,
passed as `AddedCond`). Parameter names mirror diffusers (`down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_k` becomes `down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k`).
Layout is NHWC: `sample` [B, H, W, C_in], `encoder_hidden_states` [B, T, D] -> [B, H, W, C_out].

`remat_policy` rematerialises each down/mid/up block, because AdvUnlearn back-propagates through the whole
UNet into the text encoder: "none", "full" (save nothing inside a block) or "dots" (save matmul outputs
without batch dims).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import hf_config
from advunlearn_jax.models.attention import Attention
from advunlearn_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
ADDITION_EMBED_TYPES = (None, "text_time")
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# diffusers options we do not implement, with the value SD 1.x/2.x use. Any other value is refused by name.
_FIXED_OPTIONS = {
  "center_input_sample": False,
  "only_cross_attention": False,
  "dual_cross_attention": False,
  "class_embed_type": None,
  "num_class_embeds": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "time_embedding_type": "positional",
  "time_embedding_dim": None,
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "mid_block_scale_factor": 1,
  "conv_in_kernel": 3,
  "conv_out_kernel": 3,
  "act_fn": "silu",
  "attention_type": "default",
  "cross_attention_norm": None,
  "reverse_transformer_layers_per_block": None,
  "class_embeddings_concat": False,
  "mid_block_only_cross_attention": None,
  "downsample_padding": 1,
}


def _is_default(value: Any, default: Any) -> bool:
  if isinstance(value, list | tuple):  # per-block lists of a boolean option
    return all(_is_default(v, default) for v in value)
  return value == default or (default is False and value is None)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  mid_block_type: str = "UNetMidBlock2DCrossAttn"
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)  # per down block; resolved from attention_head_dim
  cross_attention_dim: int = 768
  transformer_layers_per_block: int | tuple[int, ...] = 1  # one depth, or one per down block (SDXL)
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  sample_size: int = 64
  # SDXL's added conditioning: `text_time` embeds each micro-conditioning id like a timestep (this many
  # channels), concatenates them after the pooled text embeddings, and maps that row (this wide) to the time
  # embedding's width.
  addition_embed_type: str | None = None
  addition_time_embed_dim: int | None = None
  projection_class_embeddings_input_dim: int | None = None

  @property
  def transformer_depths(self) -> tuple[int, ...]:
    """Transformer layers per down block; up blocks take them reversed, the mid block the last (diffusers'
    unet_2d_condition.py: `reversed_transformer_layers_per_block`, `transformer_layers_per_block[-1]`)."""
    depth = self.transformer_layers_per_block
    return tuple(depth) if isinstance(depth, tuple) else (depth,) * len(self.down_block_types)

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "unet config") -> UNetConfig:
    def bad(key, why):
      return ConfigError(f"{source}: key {key!r} {why}")

    for key, value in _FIXED_OPTIONS.items():
      if key in raw and not _is_default(raw[key], value):
        raise bad(key, f"= {raw[key]!r} is not supported (only {value!r})")
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
      if key not in raw:
        raise bad(key, "is missing; is this a diffusers UNet2DConditionModel config?")
    down, up = tuple(raw["down_block_types"]), tuple(raw["up_block_types"])
    for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
      for t in types:
        if t not in allowed:
          raise bad(key, f"holds unsupported block type {t!r}; supported: {list(allowed)}")
    mid = raw.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in MID_BLOCKS:
      raise bad("mid_block_type", f"= {mid!r} is not supported; supported: {list(MID_BLOCKS)}")
    channels = tuple(raw["block_out_channels"])
    if not (len(down) == len(up) == len(channels)):
      raise bad("block_out_channels", "must have one entry per down and up block")
    # diffusers' naming quirk: `attention_head_dim` holds the number of heads unless num_attention_heads is set.
    heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)
    heads = tuple(heads) if isinstance(heads, list | tuple) else (heads,) * len(down)
    if len(heads) != len(down):
      raise bad("attention_head_dim", f"has {len(heads)} entries for {len(down)} blocks")
    for key in ("layers_per_block", "cross_attention_dim"):
      if isinstance(raw.get(key), list | tuple):
        raise bad(key, "per-block lists are not supported (SD 1.x/2.x/XL use one value)")
    depth = raw.get("transformer_layers_per_block", 1)
    if isinstance(depth, list | tuple):
      depth = tuple(depth)
      if len(depth) != len(down) or not all(isinstance(d, int) and d > 0 for d in depth):
        raise bad("transformer_layers_per_block", f"= {list(depth)} must hold one positive int per down block")
    elif not (isinstance(depth, int) and depth > 0):
      raise bad("transformer_layers_per_block", f"= {depth!r} must be a positive int or one per down block")
    added = raw.get("addition_embed_type")
    if added not in ADDITION_EMBED_TYPES:
      raise bad("addition_embed_type", f"= {added!r} is not supported; supported: {list(ADDITION_EMBED_TYPES)}")
    time_dim, added_width = raw.get("addition_time_embed_dim"), raw.get("projection_class_embeddings_input_dim")
    if added == "text_time":
      # diffusers zero-pads an odd timestep embedding; no SDXL checkpoint has one, so we refuse it.
      if not (isinstance(time_dim, int) and time_dim > 0 and time_dim % 2 == 0):
        raise bad("addition_time_embed_dim", f"= {time_dim!r} must be a positive even int for 'text_time'")
      if not (isinstance(added_width, int) and added_width > 0):
        raise bad("projection_class_embeddings_input_dim", f"= {added_width!r} must be a positive int for 'text_time'")
    else:
      time_dim = added_width = None  # read only by the added embeddings we build
    groups = raw.get("norm_num_groups", 32)
    for c in channels:
      if groups is None or c % groups:
        raise bad("norm_num_groups", f"= {groups!r} must divide every block width {channels}")
    return cls(
      in_channels=raw.get("in_channels", 4),
      out_channels=raw.get("out_channels", 4),
      down_block_types=down,
      up_block_types=up,
      mid_block_type=mid,
      block_out_channels=channels,
      layers_per_block=raw.get("layers_per_block", 2),
      num_attention_heads=heads,
      cross_attention_dim=raw.get("cross_attention_dim", 1280),
      transformer_layers_per_block=depth,
      use_linear_projection=bool(raw.get("use_linear_projection", False)),
      norm_num_groups=groups,
      norm_eps=raw.get("norm_eps", 1e-5),
      flip_sin_to_cos=raw.get("flip_sin_to_cos", True),
      freq_shift=raw.get("freq_shift", 0),
      sample_size=raw.get("sample_size", 64),
      addition_embed_type=added,
      addition_time_embed_dim=time_dim,
      projection_class_embeddings_input_dim=added_width,
    )

  @classmethod
  def from_json_file(cls, path: str) -> UNetConfig:
    raw, path = hf_config.read(path, "config.json", "a diffusers unet/ folder")
    return cls.from_dict(raw, source=path)

  def to_diffusers_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    heads = d.pop("num_attention_heads")
    if self.addition_embed_type is None:  # SD 1.x/2.x folders keep the config they always had
      for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        del d[key]
    return {
      "_class_name": "UNet2DConditionModel",
      **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()},
      "attention_head_dim": list(heads) if len(set(heads)) > 1 else heads[0],
    }


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float, max_period: float = 10000.0):
  """diffusers' `get_timestep_embedding` (float timesteps allowed, as the LMS sampler passes them)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  return emb


class GEGLU(nn.Module):
  dim_out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(nn.Dense(self.dim_out * 2, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dim: int
  dtype: Any = jnp.float32

  def setup(self):
    # diffusers' `net` is [GEGLU, Dropout, Linear]; index 1 holds no weights.
    self.net_0 = GEGLU(self.dim * 4, self.dtype)
    self.net_2 = nn.Dense(self.dim, dtype=self.dtype)

  def __call__(self, x):
    return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
  dim: int
  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    attn = lambda name: Attention(self.heads, self.dim // self.heads, self.dim, dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    x = x + attn("attn1")(norm("norm1")(x))
    x = x + attn("attn2")(norm("norm2")(x), context)
    return x + FeedForward(self.dim, self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
  channels: int
  heads: int
  num_layers: int
  use_linear_projection: bool
  groups: int
  dtype: Any = jnp.float32

  def setup(self):
    self.norm = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype)
    proj = (
      (lambda: nn.Dense(self.channels, dtype=self.dtype))
      if self.use_linear_projection
      else (lambda: conv(self.channels, kernel=1, dtype=self.dtype))
    )
    self.proj_in, self.proj_out = proj(), proj()
    self.transformer_blocks = [
      BasicTransformerBlock(self.channels, self.heads, self.dtype) for _ in range(self.num_layers)
    ]

  def __call__(self, x, context):
    b, h, w, c = x.shape
    residual = x
    x = self.norm(x)
    # A 1x1 conv and a linear layer are the same map on NHWC; only the parameter shapes differ.
    x = self.proj_in(x).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      x = block(x, context)
    return self.proj_out(x.reshape(b, h, w, c)) + residual


class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (with attention) or DownBlock2D; returns the output and every skip tensor."""

  config: UNetConfig
  index: int
  dtype: Any = jnp.float32

  def setup(self):
    cfg, i = self.config, self.index
    out = cfg.block_out_channels[i]
    self.resnets = [
      ResnetBlock2D(out, cfg.norm_num_groups, cfg.norm_eps, self.dtype) for _ in range(cfg.layers_per_block)
    ]
    if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
      self.attentions = [
        Transformer2DModel(
          out,
          cfg.num_attention_heads[i],
          cfg.transformer_depths[i],
          cfg.use_linear_projection,
          cfg.norm_num_groups,
          self.dtype,
        )
        for _ in range(cfg.layers_per_block)
      ]
    if i < len(cfg.block_out_channels) - 1:
      self.downsamplers = [Downsample2D(out, padding=1, dtype=self.dtype)]

  def __call__(self, x, temb, context):
    skips = []
    for j, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.config.down_block_types[self.index] == "CrossAttnDownBlock2D":
        x = self.attentions[j](x, context)
      skips.append(x)
    if self.index < len(self.config.block_out_channels) - 1:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D or UpBlock2D, consuming skip tensors from the matching down block."""

  config: UNetConfig
  index: int  # position among the up blocks
  dtype: Any = jnp.float32

  def setup(self):
    cfg, i = self.config, self.index
    out = cfg.block_out_channels[::-1][i]
    heads = cfg.num_attention_heads[::-1][i]
    n = cfg.layers_per_block + 1
    self.resnets = [ResnetBlock2D(out, cfg.norm_num_groups, cfg.norm_eps, self.dtype) for _ in range(n)]
    if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
      self.attentions = [
        Transformer2DModel(
          out, heads, cfg.transformer_depths[::-1][i], cfg.use_linear_projection, cfg.norm_num_groups, self.dtype
        )
        for _ in range(n)
      ]
    if i < len(cfg.block_out_channels) - 1:
      self.upsamplers = [Upsample2D(out, self.dtype)]

  def __call__(self, x, skips, temb, context):
    for j, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - j]], axis=-1), temb)
      if self.config.up_block_types[self.index] == "CrossAttnUpBlock2D":
        x = self.attentions[j](x, context)
    if self.index < len(self.config.block_out_channels) - 1:
      x = self.upsamplers[0](x)
    return x


class MidBlock(nn.Module):
  config: UNetConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    c = cfg.block_out_channels[-1]
    self.resnets = [ResnetBlock2D(c, cfg.norm_num_groups, cfg.norm_eps, self.dtype) for _ in range(2)]
    self.attentions = [
      Transformer2DModel(
        c,
        cfg.num_attention_heads[-1],
        cfg.transformer_depths[-1],
        cfg.use_linear_projection,
        cfg.norm_num_groups,
        self.dtype,
      )
    ]

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    x = self.attentions[0](x, context)
    return self.resnets[1](x, temb)


class TimestepEmbedding(nn.Module):
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


class AddedCond(NamedTuple):
  """SDXL's `added_cond_kwargs` for `addition_embed_type="text_time"`."""

  text_embeds: jax.Array  # [B, P]: the second text tower's projected pooled output
  time_ids: jax.Array  # [B, N]: micro-conditioning (SDXL base: original h, w, crop top, left, target h, w)


class SDXLCond(NamedTuple):
  """An SDXL UNet's whole conditioning as one pytree whose leaves all lead with the batch axis, so CFG's
  [uncond; cond] concatenation and the partial DDIM's row sorting and slicing treat it as they treat SD's context
  array."""

  context: jax.Array  # [B, T, D1 + D2]: both towers' penultimate states, concatenated
  added: AddedCond


def apply_conditioned(unet: nn.Module, params: Any, sample: jax.Array, timesteps: jax.Array, cond: Any) -> jax.Array:
  """`unet.apply` on a conditioning pytree: SD's context array [B, T, D], or an `SDXLCond`."""
  if isinstance(cond, SDXLCond):
    return unet.apply({"params": params}, sample, timesteps, cond.context, cond.added)
  return unet.apply({"params": params}, sample, timesteps, cond)


class UNet2DConditionModel(nn.Module):
  config: UNetConfig
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32
  remat_policy: str = "none"

  def setup(self):
    cfg = self.config
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f"remat_policy {self.remat_policy!r}; expected one of {list(REMAT_POLICIES)}")
    wrap = (
      (lambda m: m)
      if self.remat_policy == "none"
      else (lambda m: nn.remat(m, policy=REMAT_POLICIES[self.remat_policy]))
    )
    self.conv_in = conv(cfg.block_out_channels[0], dtype=self.dtype)
    self.time_embedding = TimestepEmbedding(cfg.block_out_channels[0] * 4, self.dtype)
    if cfg.addition_embed_type == "text_time":
      self.add_embedding = TimestepEmbedding(cfg.block_out_channels[0] * 4, self.dtype)
    self.down_blocks = [wrap(DownBlock)(cfg, i, self.dtype) for i in range(len(cfg.down_block_types))]
    self.mid_block = wrap(MidBlock)(cfg, self.dtype)
    self.up_blocks = [wrap(UpBlock)(cfg, i, self.dtype) for i in range(len(cfg.up_block_types))]
    self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=self.dtype)
    self.conv_out = conv(cfg.out_channels, dtype=self.dtype)

  def __call__(
    self,
    sample: jax.Array,
    timesteps: jax.Array,
    encoder_hidden_states: jax.Array,
    added_cond: AddedCond | None = None,
  ) -> jax.Array:
    cfg = self.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if sample.shape[1] % factor or sample.shape[2] % factor:
      raise ValueError(f"latent height and width {sample.shape[1:3]} must be multiples of {factor}")
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = self.time_embedding(t_emb.astype(self.dtype))
    if cfg.addition_embed_type == "text_time":
      temb = temb + self._text_time_embedding(added_cond)
    elif added_cond is not None:
      raise ValueError("added_cond given, but the UNet config has no addition_embed_type")
    context = encoder_hidden_states.astype(self.dtype)

    x = self.conv_in(sample.astype(self.dtype))
    skips = (x,)
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context)
      skips += block_skips
    x = self.mid_block(x, temb, context)
    for block in self.up_blocks:
      n = self.config.layers_per_block + 1
      x = block(x, skips[-n:], temb, context)
      skips = skips[:-n]
    x = self.conv_out(nn.silu(self.conv_norm_out(x)))
    return x.astype(jnp.float32)

  def _text_time_embedding(self, added_cond: AddedCond | None) -> jax.Array:
    """diffusers' `get_aug_embed` for "text_time": every id embedded as a timestep, flattened per row after the
    text embeddings, then the add_embedding MLP (unet_2d_condition.py, `addition_embed_type == "text_time"`)."""
    cfg = self.config
    if added_cond is None:
      raise ValueError("this UNet's config has addition_embed_type 'text_time': pass added_cond=AddedCond(...)")
    text_embeds, time_ids = added_cond
    width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
      raise ValueError(
        f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} make rows {width} wide; the config's "
        f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}"
      )
    ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    ids = ids.reshape(time_ids.shape[0], -1)
    return self.add_embedding(jnp.concatenate([text_embeds.astype(jnp.float32), ids], axis=-1).astype(self.dtype))


LIST_NAMES = (
  "down_blocks",
  "up_blocks",
  "resnets",
  "attentions",
  "downsamplers",
  "upsamplers",
  "transformer_blocks",
  "to_out",
  "net",
)


def abstract_params(config: UNetConfig, latent_hw: int = 8) -> Any:
  factor = 2 ** (len(config.block_out_channels) - 1)
  hw = max(latent_hw, factor)
  sample = jax.ShapeDtypeStruct((1, hw, hw, config.in_channels), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 77, config.cross_attention_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  added = None
  if config.addition_embed_type == "text_time":
    # Only the concatenated width shapes add_embedding, and the UNet config does not say how it splits
    # (SDXL base: 1280 + 6 ids, the refiner: 1280 + 5), so the abstract row is all text embeddings.
    width = config.projection_class_embeddings_input_dim
    added = AddedCond(jax.ShapeDtypeStruct((1, width), jnp.float32), jax.ShapeDtypeStruct((1, 0), jnp.float32))
  init = UNet2DConditionModel(config).init
  return jax.eval_shape(init, jax.random.key(0), sample, t, context, added)["params"]

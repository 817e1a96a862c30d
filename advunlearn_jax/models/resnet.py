"""Residual and resampling blocks shared by the UNet and the VAE (diffusers' `resnet.py`), layout NHWC."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv(
  features: int,
  kernel: int = 3,
  stride: int = 1,
  padding: int | None = None,
  dtype: Any = jnp.float32,
  name: str | None = None,
) -> nn.Conv:
  """A square conv with PyTorch's symmetric padding (default: 'same' for odd kernels)."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(
    features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name
  )


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, plus the (projected) timestep embedding when given; 1x1 shortcut if widths differ."""

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
    h = conv(self.out_channels, dtype=self.dtype, name="conv1")(nn.silu(h))
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
    h = conv(self.out_channels, dtype=self.dtype, name="conv2")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, kernel=1, dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding=0` is the VAE encoder's variant, padding right and bottom by one first."""

  out_channels: int
  padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.out_channels, stride=2, padding=self.padding, dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

  out_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.out_channels, dtype=self.dtype, name="conv")(x)

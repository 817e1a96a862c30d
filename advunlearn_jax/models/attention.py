"""Multi-head attention shared by the UNet and the VAE, with the kernel choice in one place.

`jax.nn.dot_product_attention` dispatches to cuDNN's fused kernel on GPUs (half precision only) and to
XLA elsewhere; `implementation=None` lets JAX pick, which is what we want on every backend.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None) -> jax.Array:
  """q [B, Tq, N, H], k/v [B, Tk, N, H] -> [B, Tq, N, H]; softmax scale H**-0.5."""
  if implementation is None and q.dtype == jnp.float32:
    implementation = "xla"  # cuDNN's fused kernel takes fp16/bf16 only
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Attention(nn.Module):
  """diffusers' `Attention` (to_q/to_k/to_v, to_out.0): self-attention, or cross-attention given `context`."""

  heads: int
  dim_head: int
  out_features: int  # the query width
  qkv_bias: bool = False
  dtype: Any = jnp.float32
  implementation: str | None = None

  def setup(self):
    inner = self.heads * self.dim_head
    self.to_q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype)
    self.to_k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype)
    self.to_v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype)
    self.to_out = [nn.Dense(self.out_features, dtype=self.dtype)]

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context
    split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    out = dot_product_attention(q, k, v, self.implementation)
    return self.to_out[0](out.reshape(*x.shape[:-1], self.heads * self.dim_head))

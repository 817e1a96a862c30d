"""Multi-head attention shared by the UNet and the VAE, with the kernel choice in one place.

Half-precision attention takes cuDNN's fused kernel when the step is lowered for an NVIDIA GPU and JAX's own
checks accept the shapes forward and backward (cuDNN present; head dim a multiple of 8, at most 256 on Hopper
and 128 before it; an even key length, which rules out cross-attention to CLIP's 77 tokens), and XLA's
everywhere else. JAX does not choose for us: `jax.nn.dot_product_attention(implementation=None)` takes XLA on
every backend (jax 0.10.2: "defaults to XLA for now"). The choice is `lax.platform_dependent`, made when the
step is lowered, so a compile for a GPU on a host without one gets the GPU's kernel.

XLA's attention materialises the [B, heads, Tq, Tk] probabilities, in fp32 even under bf16 compute, and keeps them
for the backward pass. At SD's 64x64 latents (4096 tokens) that is 512 MiB per image, which dominates an SD-size
iteration's memory with or without per-block remat (the README's memory figures under "Scaling out", from
benchmarks/iteration.py --memory_only). So on the XLA path long queries go in chunks, each rematerialised in the
backward pass: the same per-row softmax, with at most CHUNK_ELEMENTS probabilities per chunk (see the README for
the iteration's memory). A chunk keeps at least MIN_CHUNK_ROWS query rows over its batch and heads, so the batched
rollouts' wide calls split as finely as a single image's. The tiny world's 64 tokens stay one plain product, and
cuDNN's fused kernel never stores the probabilities.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# B x heads x query rows x Tk probabilities per chunk: 64 MiB in fp32. Twice as many kept more of them live at
# once in the SD-size defender update, and smaller chunks ran faster on CPU (README, "Scaling out").
CHUNK_ELEMENTS = 2**24
MIN_CHUNK_ROWS = 4096  # B x heads x query rows: fewer per chunk would starve the matmul units


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None = None, query_chunk: int | None = None
) -> jax.Array:
  """q [B, Tq, N, H], k/v [B, Tk, N, H] -> [B, Tq, N, H]; softmax scale H**-0.5. `implementation`: None picks
  (above), or "xla" | "cudnn". `query_chunk`: query rows per rematerialised chunk on the XLA path; None sizes it
  from CHUNK_ELEMENTS, 0 never chunks."""
  xla = functools.partial(_xla_attention, query_chunk=query_chunk)
  if implementation == "cudnn":
    return _cudnn_attention(q, k, v)
  if implementation == "xla" or not _cudnn_accepts(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (q, k, v))):
    return xla(q, k, v)
  return jax.lax.platform_dependent(q, k, v, cuda=_cudnn_attention, default=xla)


@functools.cache
def _cudnn_accepts(q: jax.ShapeDtypeStruct, k: jax.ShapeDtypeStruct, v: jax.ShapeDtypeStruct) -> bool:
  """Whether JAX's checks let cuDNN's kernel run these shapes forward and backward (the attack and the defender
  differentiate through every attention). They refuse fp32, a missing cuDNN, a head dim over the GPU's limit
  and, in the backward pass, odd key lengths such as CLIP's 77 tokens."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return False
  try:
    jax.eval_shape(lambda q, k, v: jax.vjp(_cudnn_attention, q, k, v)[1](q), q, k, v)
  except (NotImplementedError, RuntimeError):
    return False
  return True


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, query_chunk: int | None) -> jax.Array:
  if query_chunk != 0:
    if query_chunk is None:
      b, _, n, _ = q.shape
      # Powers of two, so SD's 2^k-token sequences split evenly: the budget's rounded down, the minimum's up.
      budget = max(CHUNK_ELEMENTS // (b * n * k.shape[1]), 1)
      least = -(-MIN_CHUNK_ROWS // (b * n))
      query_chunk = max(1 << (budget.bit_length() - 1), 1 << (least - 1).bit_length())
    if q.shape[1] > query_chunk:
      return _query_chunked(q, k, v, query_chunk)
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _query_chunked(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
  b, t, n, h = q.shape
  pad = -t % chunk  # padded query rows attend like any other and are cut off; rows never interact
  chunks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, (t + pad) // chunk, chunk, n, h)
  attend = jax.checkpoint(lambda qc: jax.nn.dot_product_attention(qc, k, v, implementation="xla"))
  out = jax.lax.map(attend, chunks.swapaxes(0, 1)).swapaxes(0, 1)
  return out.reshape(b, t + pad, n, h)[:, :t]


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

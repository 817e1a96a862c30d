"""Query-chunked attention: the dense product's values and gradients, in a fraction of its memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.models import attention


def _qkv(b, tq, tk, n=2, h=8, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for t in (tq, tk, tk)]


def _loss_and_grads(chunk):
  def loss(q, k, v):
    return jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, query_chunk=chunk)))

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("tq, tk", [(1100, 1100), (1100, 77)], ids=["self", "cross"])
def test_chunked_equals_dense(tq, tk):
  q, k, v = _qkv(2, tq, tk)
  (dense, dense_grads) = _loss_and_grads(0)(q, k, v)
  (chunked, chunked_grads) = _loss_and_grads(512)(q, k, v)  # 3 chunks, the last one padded
  np.testing.assert_allclose(chunked, dense, rtol=1e-5)
  for a, b in zip(chunked_grads, dense_grads):  # k/v gradients sum over the chunks: fp32 summation order
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.skipif(
  jax.default_backend() == "gpu",
  reason="XLA:CPU's buffers; on an H200 XLA:GPU's temporaries for the chunked fp32 program were over a quarter of "
  "the dense one's (docs/scaling.md), and SD's bf16 self-attention runs in cuDNN's kernel there",
)
def test_chunking_cuts_backward_memory():
  q, k, v = _qkv(2, 4096, 4096)  # SD's 64x64 latents
  temp = {
    chunk: _loss_and_grads(chunk).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes for chunk in (0, 1024)
  }
  assert temp[0] >= 2 * 2 * 4096 * 4096 * 4  # the dense path keeps the fp32 probabilities for the backward pass
  assert temp[1024] < temp[0] / 4, temp


def _scan_lengths(q, k, v, **kw):
  jaxpr = jax.make_jaxpr(lambda *a: attention.dot_product_attention(*a, **kw))(q, k, v)
  return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]


def test_chunk_size_follows_the_memory_budget():
  assert _scan_lengths(*_qkv(1, 64, 64)) == []  # the tiny world's 8x8 latents: one dense product
  assert _scan_lengths(*_qkv(1, 64, 64), query_chunk=16) == [4]
  assert _scan_lengths(*_qkv(1, 1024, 1024, n=8, h=1)) == []  # SD's 32x32 level, one image: fits the budget
  assert _scan_lengths(*_qkv(5, 1024, 1024, n=8, h=1)) == [4]  # the retain batch: 256-row chunks (40 MiB)
  # SD's 64x64 latents with 8 heads: 512-row chunks for one image (64 MiB), 64 for a CFG batch of 10 (80 MiB: the
  # least rows over batch and heads), 8 for the batched rollout's 72 images.
  assert _scan_lengths(*_qkv(1, 4096, 4096, n=8, h=1)) == [8]
  assert _scan_lengths(*_qkv(10, 4096, 4096, n=8, h=1)) == [64]
  assert _scan_lengths(*_qkv(72, 4096, 4096, n=8, h=1)) == [512]
  assert _scan_lengths(*_qkv(10, 4096, 77, n=8, h=1)) == [2]  # cross-attention (Tk = 77): 2048-row chunks


def _cudnn_version(version):
  """Stands in for the CUDA plugin's answer to JAX's cuDNN checks: a version, or none installed (a CPU-only
  install). Lowering for CUDA needs no GPU either way."""

  def check():
    if version is None:
      raise RuntimeError("cuDNN is not detected.")
    return version

  return check


@pytest.fixture
def cudnn(monkeypatch):
  from jax._src.cudnn import fused_attention_stablehlo

  def install(version):
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", _cudnn_version(version))
    attention._cudnn_accepts.cache_clear()

  yield install
  attention._cudnn_accepts.cache_clear()


def _lowered_kernels(platform, q, k, v):
  def loss(q, k, v):
    return jnp.sum(attention.dot_product_attention(q, k, v).astype(jnp.float32))

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()
  return {name: text.count(f"custom_call @__cudnn$fmha{name}(") for name in ("Softmax", "SoftmaxBackward")}


def test_gpu_lowering_takes_the_fused_kernel_where_jax_accepts_it(cudnn):
  cudnn(90800)
  q = jnp.zeros((2, 4096, 8, 40), jnp.bfloat16)  # SD's 64x64 self-attention in bf16
  text = jnp.zeros((2, 77, 8, 40), jnp.bfloat16)
  # Forward and backward in cuDNN: the 4096 x 4096 probabilities are never written.
  assert _lowered_kernels("cuda", q, q, q) == {"Softmax": 1, "SoftmaxBackward": 1}
  assert _lowered_kernels("cpu", q, q, q) == {"Softmax": 0, "SoftmaxBackward": 0}
  # Cross-attention to 77 tokens: JAX's backward refuses odd key lengths, so XLA, in chunks.
  assert _lowered_kernels("cuda", q, text, text) == {"Softmax": 0, "SoftmaxBackward": 0}
  assert _lowered_kernels("cuda", *(a.astype(jnp.float32) for a in (q, q, q))) == {"Softmax": 0, "SoftmaxBackward": 0}


def test_without_cudnn_every_platform_gets_the_chunked_xla_path(cudnn):
  cudnn(None)
  q = jnp.zeros((2, 4096, 8, 40), jnp.bfloat16)
  assert _lowered_kernels("cuda", q, q, q) == {"Softmax": 0, "SoftmaxBackward": 0}
  assert _scan_lengths(q, q, q) == [16]  # 256-row chunks


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's kernel runs on NVIDIA GPUs (gpu_iteration.sh)")
@pytest.mark.parametrize("tq, h", [(4096, 40), (1024, 80), (256, 160)], ids=["64x64", "32x32", "16x16"])
def test_cudnn_kernel_equals_xla_on_a_gpu(tq, h):
  """SD's self-attention levels in bf16: values and gradients of the fused kernel against XLA's dense product,
  within bf16's rounding (relative error of the whole tensor). The 160-dim heads need Hopper."""
  attention._cudnn_accepts.cache_clear()
  q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(2, tq, tq, n=8, h=h))

  def run(implementation):
    def loss(q, k, v):
      out = attention.dot_product_attention(q, k, v, implementation, query_chunk=0)
      return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(a, np.float32) for a in (out, *grads)]

  for fused, dense in zip(run("cudnn"), run("xla")):
    assert np.linalg.norm(fused - dense) <= 2e-2 * np.linalg.norm(dense)

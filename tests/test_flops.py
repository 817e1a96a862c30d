"""benchmarks/flops.py counts what XLA:CPU's cost analysis counts for each contraction, and what it leaves out:
a loop's trips after the first (docs/scaling.md: why the benchmarks' MFU no longer comes from XLA)."""

import jax
import jax.numpy as jnp
import pytest

from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.testing import tiny_models
from benchmarks import flops

NHWC = ("NHWC", "HWIO", "NHWC")


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list | tuple) else cost)["flops"]


def _conv(**kw):
  return lambda x, w: jax.lax.conv_general_dilated(x, w, dimension_numbers=NHWC, **kw)


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize(
  "fn, x, w",
  [
    (_conv(window_strides=(1, 1), padding="SAME"), (2, 9, 9, 5), (3, 3, 5, 7)),  # padding taps are not counted
    (_conv(window_strides=(2, 2), padding="SAME"), (2, 9, 9, 5), (3, 3, 5, 7)),
    (_conv(window_strides=(2, 2), padding="VALID", rhs_dilation=(2, 2)), (2, 11, 11, 3), (3, 3, 3, 4)),
    (_conv(window_strides=(1, 1), padding="SAME", feature_group_count=3), (2, 11, 11, 3), (3, 3, 1, 6)),
    # a transposed convolution: the input's holes are not counted
    (lambda x, w: jax.lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=NHWC), (1, 5, 5, 3), (3, 3, 3, 4)),
    (lambda a, b: jnp.einsum("bij,bjk->bik", a, b), (3, 4, 5), (3, 5, 6)),
  ],
)
def test_each_contraction_counts_as_xla_counts_it(fn, x, w):
  args = (S(x, jnp.float32), S(w, jnp.float32))
  assert flops.count(fn, *args) == _xla_flops(fn, *args)


def test_gradients_count_their_transposed_contractions():
  """A convolution's backward to its input and its kernel: two more convolutions of the forward's size, which
  XLA counts the same (plus the loss's element-wise square, under 2% here)."""
  f = _conv(window_strides=(2, 2), padding="SAME")
  args = (S((2, 9, 9, 5), jnp.float32), S((3, 3, 5, 7), jnp.float32))
  grad = jax.value_and_grad(lambda x, w: (f(x, w) ** 2).sum(), argnums=(0, 1))
  assert flops.count(grad, *args) == 3 * flops.count(f, *args)
  assert 0.98 < flops.count(grad, *args) / _xla_flops(grad, *args) < 1.0


def test_a_loop_counts_every_trip_where_xla_counts_one():
  a, b = S((6, 16, 16), jnp.float32), S((16, 16), jnp.float32)
  mapped = lambda a, b: jax.lax.map(lambda x: x @ b, a)  # a scan: its length is in the jaxpr
  one = 2 * 16 * 16 * 16
  assert flops.count(mapped, a, b) == 6 * one
  assert _xla_flops(mapped, a, b) < 1.01 * one  # the while loop XLA compiles it to: one trip (and its counter)

  def walk(x, n):  # a trip count known only at run time, as a rollout's
    return jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]

  def renew(x, flag):
    return jax.lax.cond(flag, lambda x: x @ x @ x, lambda x: x, x)

  square = S((16, 16), jnp.float32)
  assert flops.parts(walk, square, S((), jnp.int32)) == flops.Parts(0.0, (one,), ())
  assert flops.parts(renew, square, S((), bool)) == flops.Parts(
    0.0, (), ((0.0, 2 * one),)
  )  # lax.cond: the false branch first
  assert flops.count(renew, square, S((), bool)) == 2 * one
  with pytest.raises(ValueError, match="trip count"):
    flops.count(walk, square, S((), jnp.int32))


def test_a_unet_forward_is_its_contractions():
  """The micro UNet: every convolution and matmul counted (attention unchunked at this size), and only XLA's
  element-wise work (norms, softmax, activations: large at 32 channels, about 1% at SD size) on top."""
  cfg = tiny_models.UNET
  unet = unet_lib.UNet2DConditionModel(cfg)
  args = (S((1, 8, 8, 4), jnp.float32), S((1,), jnp.int32), S((1, 77, cfg.cross_attention_dim), jnp.float32))
  fn = lambda p, *a: unet.apply({"params": p}, *a)
  params = unet_lib.abstract_params(cfg)
  ours, xla = flops.count(fn, params, *args), _xla_flops(fn, params, *args)
  assert 0.85 < ours / xla < 1.0, (ours, xla)

"""Matmul and convolution FLOPs of a JAX function, counted from its jaxpr: the program the model is, before any
compiler sees it.

The MFU figures used to take one UNet forward's FLOPs from XLA's cost analysis of the compiled program. That count
depends on the backend: XLA:GPU hands SD's convolutions and attention to cuDNN as custom calls, and a while loop's
body (the chunked attention's `lax.map`) may be counted once, not per trip. A count from the jaxpr sees every
`dot_general` and `conv_general_dilated` the function asks for, including what differentiation, `remat` and
loops add (a scan's body times its length), on any host, without compiling.

Each contraction is counted as XLA's HloCostAnalysis counts it (two FLOPs per multiply-add): a dot as
2 x batch x M x K x N; a convolution as 2 x (batch / batch groups) x output features x (input features / feature
groups) x, per spatial dimension, the (output position, kernel tap) pairs that land on an input element (neither
padding nor a hole of an input dilation). Element-wise work (norms, softmax, activations) is left out: it is what
XLA:CPU's count adds on top (`tests/test_benchmarks.py` bounds the gap on a small UNet).

  from benchmarks import flops
  flops.count(fn, *args)   # args: arrays or jax.ShapeDtypeStruct; the FLOPs of one call
  flops.parts(fn, *args)   # the same by when they run: every call, per loop trip, per cond branch
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
from jax.extend import core


class Parts(NamedTuple):
  """A program's FLOPs by when they run: `fixed` on every call; per trip of each while loop (`loops`: how many
  trips a call makes is a runtime value, such as a rollout's UNet calls, also for a loop inside a scan); each
  cond's branches (`branches`: one runs)."""

  fixed: float
  loops: tuple[float, ...] = ()
  branches: tuple[tuple[float, ...], ...] = ()


def count(fn, *args, **kwargs) -> float:
  """FLOPs of the matmuls and convolutions of one call of `fn(*args, **kwargs)` (abstract args are enough); a
  cond counts its costliest branch. ValueError if a while loop holds matmuls (use `parts`)."""
  p = parts(fn, *args, **kwargs)
  if p.loops:
    raise ValueError("a while loop with matmuls in its body: its trip count is not in the jaxpr (use parts)")
  return p.fixed + sum(max(b) for b in p.branches)


def parts(fn, *args, **kwargs) -> Parts:
  return jaxpr_parts(jax.make_jaxpr(fn, **kwargs)(*args).jaxpr)


def jaxpr_parts(jaxpr: core.Jaxpr) -> Parts:
  fixed, loops, branches = 0.0, [], []
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      fixed += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      fixed += _conv_flops(eqn)
    elif name in ("while", "cond"):
      inner = [jaxpr_parts(j) for j in _sub_jaxprs(eqn.params.values())]
      if any(p.loops or p.branches for p in inner):
        raise ValueError(f"a {name} inside a {name}: not counted")
      if name == "cond":
        branches.append(tuple(p.fixed for p in inner))
      elif sum(p.fixed for p in inner):  # cond_jaxpr + body_jaxpr, per trip
        loops.append(sum(p.fixed for p in inner))
    else:  # scan: its body `length` times; jit, remat, custom_jvp/vjp, shard_map...: their programs once
      times = eqn.params["length"] if name == "scan" else 1
      for p in (jaxpr_parts(j) for j in _sub_jaxprs(eqn.params.values())):
        if times > 1 and p.branches:
          raise ValueError("a cond inside a scan: not counted")
        fixed += times * p.fixed
        loops += p.loops
        branches += p.branches
  return Parts(fixed, tuple(loops), tuple(branches))


def _sub_jaxprs(values: Iterable[Any]):
  for v in values:
    if isinstance(v, core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, core.Jaxpr):
      yield v
    elif isinstance(v, tuple | list):
      yield from _sub_jaxprs(v)


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
  rhs_free = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
  return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _valid_taps(in_size: int, out_size: int, k: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
  """(output position, kernel tap) pairs whose input position is a real element: inside the input, not padding,
  not a hole between dilated input elements (a transposed convolution's)."""
  last = (in_size - 1) * lhs_dil
  n = 0
  for o in range(out_size):
    for t in range(k):
      p = o * stride + t * rhs_dil - pad_lo
      n += 0 <= p <= last and p % lhs_dil == 0
  return n


def _conv_flops(eqn) -> float:
  lhs, rhs = (v.aval.shape for v in eqn.invars)
  out = eqn.outvars[0].aval.shape
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec  # (batch/out-feature, feature, spatial...)
  spatial = len(lhs_spec) - 2
  lhs_dil = p["lhs_dilation"] or (1,) * spatial
  rhs_dil = p["rhs_dilation"] or (1,) * spatial
  taps = 1
  for i in range(spatial):
    taps *= _valid_taps(
      lhs[lhs_spec[2 + i]],
      out[out_spec[2 + i]],
      rhs[rhs_spec[2 + i]],
      p["window_strides"][i],
      p["padding"][i][0],
      lhs_dil[i],
      rhs_dil[i],
    )
  batch = lhs[lhs_spec[0]] // p["batch_group_count"]
  in_features = lhs[lhs_spec[1]] // p["feature_group_count"]
  return 2.0 * batch * out[out_spec[1]] * in_features * taps

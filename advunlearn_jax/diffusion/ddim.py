"""The reference's partial DDIM rollout that produces x_t for every AdvUnlearn loss (spec section 2.2).

Exact ldm semantics, inherited by AdvUnlearn from ESD:
  * grid tau = [1, 21, ..., 981] (`arange(0, 1000, 20) + 1`);
  * `t_start=-1` drops the last grid point, so sampling starts from pure noise treated as t = 961 and walks
    49 points [961, 941, ..., 1] with loop index = 48 - i;
  * the loop stops after the step whose `index + 1 == t_enc`: 49 UNet (CFG) steps for t_enc in {0, 1},
    otherwise 50 - t_enc;
  * eta = 0: x_prev = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev) * eps, a_prev = alphas_cumprod[tau[index - 1]]
    (alphas_cumprod[0] for index 0).

The denoiser is passed in as `eps_fn(x, t) -> eps` (classifier-free guidance already applied), so the same
rollout serves the frozen model, a fine-tuned UNet and the tests' tiny UNets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


class DDIMTables(NamedTuple):
  timesteps: jax.Array  # [S] int32: the ldm grid tau
  alphas: jax.Array  # [S] alphas_cumprod[tau]
  alphas_prev: jax.Array  # [S] alphas_cumprod[tau[index - 1]], alphas_cumprod[0] first


def ldm_tables(alphas_cumprod: np.ndarray, ddim_steps: int = 50) -> DDIMTables:
  num_train = len(alphas_cumprod)
  tau = np.arange(0, num_train, num_train // ddim_steps) + 1
  alphas = alphas_cumprod[tau]
  alphas_prev = np.concatenate([alphas_cumprod[:1], alphas_cumprod[tau[:-1]]])
  return DDIMTables(
    jnp.asarray(tau, jnp.int32), jnp.asarray(alphas, jnp.float32), jnp.asarray(alphas_prev, jnp.float32)
  )


def num_unet_steps(t_enc: jax.Array | int, ddim_steps: int = 50) -> jax.Array:
  """UNet (CFG) steps the reference runs for a given t_enc: 0 -> 49, 1 -> 49, 2 -> 48, 49 -> 1."""
  return jnp.minimum(ddim_steps - 1, ddim_steps - jnp.asarray(t_enc, jnp.int32))


def ddim_step(x: jax.Array, eps: jax.Array, a_t: jax.Array, a_prev: jax.Array) -> jax.Array:
  x0 = (x - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t)
  return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps


def _step_at(i: jax.Array, x: jax.Array, eps_fn: EpsFn, tables: DDIMTables) -> jax.Array:
  index = tables.timesteps.shape[0] - 2 - i  # 48 - i: the truncated grid has S - 1 points
  t = tables.timesteps[index]
  return ddim_step(x, eps_fn(x, t), tables.alphas[index], tables.alphas_prev[index])


def partial_ddim(eps_fn: EpsFn, x_T: jax.Array, t_enc: jax.Array | int, tables: DDIMTables) -> jax.Array:
  """x_t for one t_enc, traced once for every t_enc (a `while_loop` with a dynamic trip count)."""
  n = num_unet_steps(t_enc, tables.timesteps.shape[0])
  _, x = jax.lax.while_loop(
    lambda carry: carry[0] < n, lambda carry: (carry[0] + 1, _step_at(carry[0], carry[1], eps_fn, tables)), (0, x_T)
  )
  return x


def ddim_trajectory(eps_fn: EpsFn, x_T: jax.Array, tables: DDIMTables) -> jax.Array:
  """Every intermediate latent of a full rollout: out[k] = x after k + 1 steps, i.e. x_t for the t_enc
  with num_unet_steps(t_enc) == k + 1. [S - 1, *x_T.shape]."""

  def body(x, i):
    x = _step_at(i, x, eps_fn, tables)
    return x, x

  _, xs = jax.lax.scan(body, x_T, jnp.arange(tables.timesteps.shape[0] - 1))
  return xs


def trajectory_index(t_enc: jax.Array | int, ddim_steps: int = 50) -> jax.Array:
  """Row of `ddim_trajectory`'s output that equals `partial_ddim(..., t_enc)`."""
  return num_unet_steps(t_enc, ddim_steps) - 1


class RolloutStats(NamedTuple):
  """What a rollout cost, in DDIM steps: `calls` run one after another (each a CFG UNet call), `computed_rows`
  the rows those calls processed, `useful_rows` the rows a per-element rollout would have processed."""

  calls: jax.Array
  computed_rows: jax.Array
  useful_rows: jax.Array


def bucket_widths(rows: int, buckets: int, multiple: int = 1) -> tuple[int, ...]:
  """Batch widths of a batched rollout's buckets: `buckets` evenly spaced widths from `rows` down, each rounded up
  to a multiple of `multiple` (the mesh's data size, so every bucket splits evenly) and deduplicated.

  Active elements fall off linearly when t_enc is uniform, so with B evenly spaced widths a bucket runs on
  average 1/(2B) of its rows idle: about B / (B + 1) of the computed rows are useful."""
  widths = []
  for b in range(buckets):
    w = -(-rows * (buckets - b) // buckets)  # ceil
    w = min(-(-w // multiple) * multiple, -(-rows // multiple) * multiple)
    if not widths or w < widths[-1]:
      widths.append(w)
  return tuple(widths)


def partial_ddim_batched(
  eps_fn: Callable[[jax.Array, jax.Array, object], jax.Array],
  x_T: jax.Array,
  t_enc: jax.Array,
  context: object,
  tables: DDIMTables,
  widths: tuple[int, ...],
  slots: int = 0,
) -> tuple[jax.Array, RolloutStats]:
  """`partial_ddim` for every row at once, each with its own t_enc: [R, ...] -> [R, ...].

  Two ways to batch the same walks, both longest walk first. `slots` = 0: buckets of static batch widths
  `widths` (descending, the first >= R) that all take the same DDIM step (`_bucketed`): the fewest sequential
  calls, the longest walk's, at batch widths that shrink with the walking rows. `slots` = W > 0: W slots,
  each walking one row at its own grid point and taking the next row as soon as its walk ends (`_slotted`):
  about sum(walks) / W calls of one batch width, nearly all of whose rows are useful. `eps_fn(x, t, context)` sees
  the rows' slice of `context` (a pytree of [R, ...] arrays, e.g. the CFG conditioning); `t` is the grid's scalar
  timestep for buckets, one per row for slots."""
  rows = x_T.shape[0]
  if not slots and (not widths or widths[0] < rows or list(widths) != sorted(set(widths), reverse=True)):
    raise ValueError(f"bucket widths {widths} must be distinct, descending, the first >= {rows} rows")
  n = num_unet_steps(t_enc, tables.timesteps.shape[0])
  stats = lambda calls, computed: RolloutStats(calls, computed, jnp.sum(n))
  if not rows:
    zero = jnp.zeros((), jnp.int32)
    return x_T, stats(zero, zero)
  order = jnp.argsort(-n, stable=True)
  sort = lambda a: a[order]
  if slots:
    x, calls, computed = _slotted(eps_fn, sort(x_T), n[order], jax.tree.map(sort, context), tables, slots)
  else:
    x, calls, computed = _bucketed(eps_fn, sort(x_T), n[order], jax.tree.map(sort, context), tables, widths)
  return jnp.zeros_like(x_T).at[order].set(x), stats(calls, computed)


def _bucketed(eps_fn, x_T, n, context, tables: DDIMTables, widths: tuple[int, ...]):
  """Rows sorted longest walk first, so the walking rows are a prefix that only shrinks. Each bucket steps its
  prefix for as long as the walking rows exceed the next bucket's width; rows that are done are held by a mask.
  The sequential calls are the longest walk's (at most S - 1), the idle rows at most the gap between neighbouring
  widths."""
  pad = widths[0] - x_T.shape[0]  # pad rows take no step (n = 0)
  padded = lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)])
  n, x, context = padded(n), padded(x_T), jax.tree.map(padded, context)
  walking = lambda i: jnp.sum(n > i)

  def level(width: int, next_width: int, carry):
    def body(carry):
      i, x, calls, computed = carry
      rows_of = lambda a: a[:width]
      xs, ctx = rows_of(x), jax.tree.map(rows_of, context)
      stepped = _step_at(i, xs, lambda xx, t: eps_fn(xx, t, ctx), tables)
      keep = (i < rows_of(n)).reshape((width,) + (1,) * (x.ndim - 1))
      x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(keep, stepped, xs), 0, 0)
      return i + 1, x, calls + 1, computed + width

    return jax.lax.while_loop(lambda c: walking(c[0]) > next_width, body, carry)

  zero = jnp.zeros((), jnp.int32)
  carry = (zero, x, zero, zero)
  for width, next_width in zip(widths, (*widths[1:], 0)):
    carry = level(width, next_width, carry)
  _, x, calls, computed = carry
  return x[: x_T.shape[0]], calls, computed


def _slotted(eps_fn, x_T, n, context, tables: DDIMTables, slots: int):
  """Continuous batching: `slots` rows walk at once, each at its own step; a slot whose row has finished writes it
  out and takes the next row from the top of the grid. Taking rows longest walk first is LPT list scheduling, so
  the calls are max(longest walk, about sum(walks) / slots) and only the last few calls run slots idle. One UNet
  batch width for the whole rollout keeps the compiled program to one UNet instance (and one set of kernels to
  tune on a GPU)."""
  rows = x_T.shape[0]
  empty = rows  # a slot holding no row
  ready = jnp.sum(n > 0)  # rows with no step to take (the sorted tail) keep x_T
  last = tables.timesteps.shape[0] - 2
  row = jnp.where(jnp.arange(slots) < ready, jnp.arange(slots), empty)
  at = lambda a, r: a[jnp.minimum(r, rows - 1)]
  per_row = lambda a: a.reshape((slots,) + (1,) * (x_T.ndim - 1))

  def step_fn(carry):
    row, step, x, out, calls, next_row = carry
    index = last - step
    ctx = jax.tree.map(lambda a: at(a, row), context)
    eps = eps_fn(x, tables.timesteps[index], ctx)
    stepped = ddim_step(x, eps, per_row(tables.alphas[index]), per_row(tables.alphas_prev[index]))
    done = (row < empty) & (step + 1 >= at(n, row))
    out = out.at[jnp.where(done, row, empty)].set(stepped, mode="drop")
    new_row = next_row + jnp.cumsum(done) - 1  # freed slots take the next rows in order
    load = done & (new_row < ready)
    step = jnp.where(done | (row == empty), 0, step + 1)
    row = jnp.where(done, jnp.where(load, new_row, empty), row)
    idle = jnp.zeros_like(stepped)  # an emptied slot walks zeros from the top, never growing latents
    x = jnp.where(per_row(load), at(x_T, new_row), jnp.where(per_row(row < empty), stepped, idle))
    return row, step, x, out, calls + 1, next_row + jnp.sum(done)

  zero = jnp.zeros((), jnp.int32)
  init = (row, jnp.zeros((slots,), jnp.int32), at(x_T, row), x_T, zero, jnp.minimum(slots, ready))
  _, _, _, out, calls, _ = jax.lax.while_loop(lambda c: jnp.any(c[0] < empty), step_fn, init)
  return out, calls, calls * slots

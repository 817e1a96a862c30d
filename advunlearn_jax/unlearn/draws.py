"""Training points (t_enc, t_ddpm, x_t) and the frozen model's predictions at them (spec 2.2-2.3).

For text-encoder methods everything here depends only on frozen models and the random draw, never on the
trained encoder or the adversarial prompt, which is what lets `bank.py` precompute it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from advunlearn_jax.diffusion import ddim
from advunlearn_jax.diffusion.sampling import cfg_eps

UNetFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]  # (params, x, t, context) -> eps


class Timesteps(NamedTuple):
  t_enc: jax.Array  # scalar int32 in [0, ddim_steps)
  t_ddpm: jax.Array  # scalar int32 in [1000 t_enc / S, 1000 (t_enc + 1) / S)


def draw_timesteps(key: jax.Array, ddim_steps: int = 50, num_train: int = 1000) -> Timesteps:
  k1, k2 = jax.random.split(key)
  t_enc = jax.random.randint(k1, (), 0, ddim_steps)
  # round(1000 * t_enc / 50) .. round(1000 * (t_enc + 1) / 50) - 1, as the reference draws it
  lo = jnp.round(num_train * t_enc / ddim_steps).astype(jnp.int32)
  hi = jnp.round(num_train * (t_enc + 1) / ddim_steps).astype(jnp.int32)
  t_ddpm = jax.random.randint(k2, (), lo, hi)
  return Timesteps(t_enc.astype(jnp.int32), t_ddpm)


def rollout(
  unet_fn: UNetFn,
  unet_params: Any,
  noise: jax.Array,
  cond: jax.Array,
  uncond: jax.Array,
  t_enc: jax.Array,
  tables: ddim.DDIMTables,
  guidance: float,
) -> jax.Array:
  """x_t by the reference's partial DDIM with CFG (no gradient flows through it)."""
  eps_fn = lambda x, t: cfg_eps(lambda xx, tt, cc: unet_fn(unet_params, xx, tt, cc), x, t, cond, uncond, guidance)
  return jax.lax.stop_gradient(ddim.partial_ddim(eps_fn, noise, t_enc, tables))


def predict(unet_fn: UNetFn, unet_params: Any, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
  t = jnp.broadcast_to(t, (x.shape[0],))
  return jax.lax.stop_gradient(unet_fn(unet_params, x, t, context))


def broadcast_batch(context: jax.Array, n: int) -> jax.Array:
  """[77, D] -> [n, 77, D]."""
  return jnp.broadcast_to(context, (n, *context.shape))

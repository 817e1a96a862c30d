"""The timesteps of a training point (spec 2.2): t_enc on the DDIM grid, t_ddpm in its bin."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


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

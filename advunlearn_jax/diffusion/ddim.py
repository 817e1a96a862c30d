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

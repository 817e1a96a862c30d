"""The trajectory bank: partial-DDIM rollouts of the frozen model, computed once and reused.

For text-encoder methods x_t depends only on the frozen UNet, the frozen encoder's prompt embedding and the
start noise, never on theta or delta (spec 9). One full rollout of 49 DDIM steps passes through the x_t of
every t_enc, so keeping each rollout's intermediate latents gives all 50 t_enc values for the price of one
rollout; training then samples (trajectory, t_enc) instead of re-running up to 49 CFG steps per loss.

What is stored: latents only, [C, T, 49, h, w, c] for the concepts and [N, T_r, 49, h, w, c] for the retain
prompts. t_ddpm is still drawn fresh in its bin and the frozen predictions (e_0, e_p, the retain targets)
are still computed at it, three frozen forwards per step: storing them would freeze t_ddpm per entry (or cost
20x the memory for every value of the bin) and break the unlearn and retain terms' shared timestep. The
distribution the losses see is the online one, with noise reused across the T trajectories.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from advunlearn_jax.diffusion import ddim
from advunlearn_jax.diffusion.sampling import cfg_eps
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.unet import UNet2DConditionModel
from advunlearn_jax.unlearn import trainable

SOURCES = ("online", "bank")


class Bank(NamedTuple):
  concept: jax.Array  # [C, T, S - 1, h, w, c]
  retain: jax.Array  # [N, T_r, S - 1, h, w, c]


def check_method(method: str, source: str) -> None:
  if source not in SOURCES:
    raise ConfigError(f"config.train.xt_source is {source!r}; valid: {list(SOURCES)}")
  if source == "bank" and not trainable.is_text_method(method):
    raise ConfigError(
      f"config.train.xt_source='bank' needs a text-encoder method: with train.method={method!r} x_t comes from the "
      "UNet being trained, so it changes every step and cannot be precomputed. Use xt_source='online'."
    )


def _trajectories(unet, unet_params, noise, cond, uncond, tables, guidance):
  unet_fn = lambda x, t, ctx: unet.apply({"params": unet_params}, x, t, ctx)
  eps_fn = lambda x, t: cfg_eps(unet_fn, x, t, cond, uncond, guidance)
  return jnp.moveaxis(ddim.ddim_trajectory(eps_fn, noise, tables), 0, 1)  # [B, S - 1, ...]


def build(
  unet: UNet2DConditionModel,
  unet_params: Any,
  frozen,
  key: jax.Array,
  *,
  concept_trajectories: int,
  retain_trajectories: int,
  latent_shape: tuple[int, int, int],
  guidance: float,
  chunk: int = 8,
) -> Bank:
  """Rolls out every concept `concept_trajectories` times and every retain prompt `retain_trajectories` times."""
  run = jax.jit(_trajectories, static_argnums=(0, 6))

  def rollouts(key, conds):  # conds [M, 77, D] -> [M, ...], in chunks of `chunk` rollouts
    outs = []
    for start in range(0, conds.shape[0], chunk):
      c = conds[start : start + chunk]
      noise = jax.random.normal(jax.random.fold_in(key, start), (c.shape[0], *latent_shape))
      uncond = jnp.broadcast_to(frozen.emb_uncond, c.shape)
      outs.append(run(unet, unet_params, noise, c, uncond, frozen.tables, guidance))
    return jnp.concatenate(outs)

  k_c, k_r = jax.random.split(key)
  n_c, n_r = frozen.concept_emb.shape[0], frozen.retain_emb.shape[0]
  concept = rollouts(k_c, jnp.repeat(frozen.concept_emb, concept_trajectories, axis=0))
  retain = rollouts(k_r, jnp.repeat(frozen.retain_emb, retain_trajectories, axis=0))
  return Bank(
    concept.reshape(n_c, concept_trajectories, *concept.shape[1:]),
    retain.reshape(n_r, retain_trajectories, *retain.shape[1:]),
  )


def concept_latents(bank: Bank, key: jax.Array, c: jax.Array, t_enc: jax.Array, n: int) -> jax.Array:
  """x_t for concept c at t_enc, from n trajectories drawn uniformly: [n, h, w, c]."""
  traj = jax.random.randint(key, (n,), 0, bank.concept.shape[1])
  return bank.concept[c, traj, ddim.trajectory_index(t_enc, bank.concept.shape[2] + 1)]


def retain_latents(bank: Bank, key: jax.Array, idx: jax.Array, t_enc: jax.Array) -> jax.Array:
  traj = jax.random.randint(key, idx.shape, 0, bank.retain.shape[1])
  return bank.retain[idx, traj, ddim.trajectory_index(t_enc, bank.retain.shape[2] + 1)]

"""The trajectory bank: partial-DDIM rollouts of the frozen model, kept and reused, renewed as training goes.

For text-encoder methods x_t depends only on the frozen UNet, the frozen encoder's prompt embedding and the
start noise, never on theta or delta (spec 9). One full rollout of 49 DDIM steps passes through the x_t of
every t_enc, so keeping each rollout's intermediate latents gives all 50 t_enc values for the price of one
rollout; training then samples (trajectory, t_enc) instead of re-running up to 49 CFG steps per loss.

What is stored: latents only, [C, T, 49, h, w, c] for the concepts and [N, T_r, 49, h, w, c] for the retain
prompts. t_ddpm is still drawn fresh in its bin and the frozen predictions (e_0, e_p, the retain targets)
are still computed at it: storing them would freeze t_ddpm per entry (or cost 20x the memory for every value
of the bin) and break the unlearn and retain terms' shared timestep.

What the bank changes is the start codes. The reference draws a fresh one for every loss (about 25k concept and
5k retain codes over a run); a fixed bank reuses T per concept and T_r per retain prompt for the whole run. A
renewing bank (`refresh_trajectories` > 0) rolls out fresh full trajectories inside the training step and
writes them over the oldest: every `refresh_every` iterations `refresh_trajectories` per concept and
`refresh_retain` retain prompts' (round robin), so a run sees thousands of start codes instead of T. The bank
lives in the train state and its checkpoints, so a resumed run continues with the same trajectories and does not
build them again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from advunlearn_jax.diffusion import ddim
from advunlearn_jax.diffusion.sampling import cfg_eps
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.unet import UNet2DConditionModel, apply_conditioned
from advunlearn_jax.unlearn import cond_tree, trainable

SOURCES = ("online", "online_sequential", "bank")


@dataclasses.dataclass(frozen=True)
class BankConfig:
  """config.bank under its field names (its defaults config_lib's)."""

  concept_trajectories: int  # T: rollouts kept per concept (each serves all 50 t_enc)
  retain_trajectories: int  # T_r: rollouts kept per retain prompt
  refresh_trajectories: int  # fresh rollouts per concept written over the oldest per renewal; 0: fixed bank
  refresh_retain: int  # retain prompts (round robin) whose oldest rollout is replaced per renewal
  refresh_every: int  # iterations between renewals

  @classmethod
  def from_config(cls, section) -> BankConfig:
    """`config.bank`, validated."""
    cfg = cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})
    validate(cfg)
    return cfg


class Bank(NamedTuple):
  concept: jax.Array  # [C, T, S - 1, h, w, c]
  retain: jax.Array  # [N, T_r, S - 1, h, w, c]


def check_source(source: str, trained: trainable.Trained) -> None:
  """`train.xt_source` is one of SOURCES, and `bank` only where x_t does not depend on the trained tower."""
  method = trained.method
  if source not in SOURCES:
    raise ConfigError(f"config.train.xt_source is {source!r}; valid: {list(SOURCES)}")
  if source == "bank" and trained.tower != "text_encoder":
    raise ConfigError(
      f"config.train.xt_source='bank' needs a text-encoder method: with train.method={method!r} x_t comes from the "
      "UNet being trained, so it changes every step and cannot be precomputed. Use xt_source='online'."
    )


def _trajectories(unet, unet_params, noise, cond, uncond, tables, guidance):
  unet_fn = lambda x, t, ctx: apply_conditioned(unet, unet_params, x, t, ctx)
  eps_fn = lambda x, t: cfg_eps(unet_fn, x, t, cond, uncond, guidance)
  return jnp.moveaxis(ddim.ddim_trajectory(eps_fn, noise, tables), 0, 1)  # [B, S - 1, ...]


def build(
  unet: UNet2DConditionModel,
  unet_params: Any,
  frozen,
  key: jax.Array,
  cfg: BankConfig,
  *,
  latent_shape: tuple[int, int, int],
  guidance: float,
  chunk: int = 8,
) -> Bank:
  """Rolls out every concept `cfg.concept_trajectories` times and every retain prompt `cfg.retain_trajectories`
  times."""
  run = jax.jit(_trajectories, static_argnums=(0, 6))

  def rollouts(key, conds):  # conds [M, 77, D] (or an SDXLCond) -> [M, ...], in chunks of `chunk` rollouts
    outs = []
    for start in range(0, cond_tree.rows(conds), chunk):
      c = cond_tree.take(conds, slice(start, start + chunk))
      noise = jax.random.normal(jax.random.fold_in(key, start), (cond_tree.rows(c), *latent_shape))
      uncond = cond_tree.broadcast_like(frozen.emb_uncond, c)
      outs.append(run(unet, unet_params, noise, c, uncond, frozen.tables, guidance))
    return jnp.concatenate(outs)

  k_c, k_r = jax.random.split(key)
  n_c, n_r = cond_tree.rows(frozen.concept_emb), cond_tree.rows(frozen.retain_emb)
  concept = rollouts(k_c, cond_tree.repeat(frozen.concept_emb, cfg.concept_trajectories))
  retain = rollouts(k_r, cond_tree.repeat(frozen.retain_emb, cfg.retain_trajectories))
  return Bank(
    concept.reshape(n_c, cfg.concept_trajectories, *concept.shape[1:]),
    retain.reshape(n_r, cfg.retain_trajectories, *retain.shape[1:]),
  )


def validate(cfg: BankConfig) -> None:
  if cfg.concept_trajectories < 1 or cfg.retain_trajectories < 1:
    raise ConfigError("config.bank.concept_trajectories and config.bank.retain_trajectories must be >= 1")
  if not 0 <= cfg.refresh_trajectories <= cfg.concept_trajectories:
    raise ConfigError(
      f"config.bank.refresh_trajectories is {cfg.refresh_trajectories}; expected 0 (a fixed bank) up to "
      f"bank.concept_trajectories ({cfg.concept_trajectories})"
    )
  if cfg.refresh_retain < 0:
    raise ConfigError(f"config.bank.refresh_retain must be >= 0, got {cfg.refresh_retain}")
  if cfg.refresh_every < 1:
    raise ConfigError(f"config.bank.refresh_every must be >= 1, got {cfg.refresh_every}")


def concept_latents(bank: Bank, concept: jax.Array, trajectory: jax.Array, t_enc: jax.Array) -> jax.Array:
  """x_t of rows (concept index, trajectory, t_enc), each [n]: [n, h, w, c]."""
  return bank.concept[concept, trajectory, ddim.trajectory_index(t_enc, bank.concept.shape[2] + 1)]


def retain_latents(bank: Bank, prompt: jax.Array, trajectory: jax.Array, t_enc: jax.Array) -> jax.Array:
  return bank.retain[prompt, trajectory, ddim.trajectory_index(t_enc, bank.retain.shape[2] + 1)]


def renew(
  cfg: BankConfig,
  unet: UNet2DConditionModel,
  frozen,
  bank: Bank,
  key: jax.Array,
  step: jax.Array,
  guidance: float,
) -> Bank:
  """`bank` with fresh trajectories over its oldest when `step` is a renewal step (inside the jitted step).

  Renewal r (= step // refresh_every) rolls out `refresh_trajectories` new trajectories for every concept, into
  slots r R .. r R + R - 1 (mod T), and one for each of the retain prompts r R_r .. r R_r + R_r - 1 (mod N),
  into their slot (those indices // N) mod T_r: round robin, so the slot written is always the oldest."""
  n_c, t_c = bank.concept.shape[:2]
  n_r, t_r = bank.retain.shape[:2]
  per_c, per_r = cfg.refresh_trajectories, cfg.refresh_retain

  def write(bank):
    r = step // cfg.refresh_every
    retain_slot = r * per_r + jnp.arange(per_r)
    prompts = retain_slot % n_r
    conds = cond_tree.concat([cond_tree.repeat(frozen.concept_emb, per_c), cond_tree.take(frozen.retain_emb, prompts)])
    noise = jax.random.normal(key, (cond_tree.rows(conds), *bank.concept.shape[3:]), bank.concept.dtype)
    uncond = cond_tree.broadcast_like(frozen.emb_uncond, conds)
    fresh = jax.lax.stop_gradient(_trajectories(unet, frozen.unet, noise, conds, uncond, frozen.tables, guidance))
    concept_slots = (r * per_c + jnp.arange(per_c)) % t_c
    concept = bank.concept.at[:, concept_slots].set(fresh[: n_c * per_c].reshape(n_c, per_c, *fresh.shape[1:]))
    retain = bank.retain.at[prompts, (retain_slot // n_r) % t_r].set(fresh[n_c * per_c :])
    return Bank(concept, retain)

  return jax.lax.cond(step % cfg.refresh_every == 0, write, lambda b: b, bank)

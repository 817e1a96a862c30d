"""STEREO's two losses and its one jitted erasing step (Srivatsan et al., CVPR 2025), as the authors' code runs
them: koushiksrivats/robust-concept-erasing at 86f124f (utils/stereo.py, utils/apg.py, utils/utils.py; the line
numbers below are that commit's). The orchestration (rounds, textual inversion, resume) is training/stereo_runs.py.

Both stages fine-tune the UNet alone with the same step; they differ in the target:
  * STE's erase (stereo.py:88): APG's `normalized_guidance(e_p, e_0, g)`. With apg.py's defaults (eta = 1, no
    momentum, no norm threshold) the parallel and orthogonal parts add back to the whole difference, so the
    target is exactly e_p - (g - 1) (e_p - e_0); with the default g = 2 that is e_0 (ESD's eta = g - 2 = 0).
  * REO's (stereo.py:459-478): `normalized_compositional_guidance` over the erase concepts (scale -g each) and
    one anchor (scale +g): e_0 + (g - 1)(e_a - e_0) + (-g - 1) mean_j (e_j - e_0). reference quirk: the help text
    (train.py:28) calls g "+1 of the scale"; the negatives get g + 1 = 3, the anchor g - 1 = 1.

x_t as diffusers' DDIM does it (utils.py `diffusion`, stereo.py:56-73): i ~ U{1, ..., S - 2}; x_T ~ N(0, 1);
i DDIM steps of the *student* UNet with CFG `start_guidance` on the erased prompt over the leading grid
t_k = (S - 1 - k) * 1000 / S + 1; the losses' t is then set_timesteps(1000)'s timesteps[int(i / S * 1000)],
i.e. 1000 - int(i * 1000 / S) (steps_offset 1): reference quirk, t is not the level x_t was rolled to.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from advunlearn_jax.diffusion import ddim
from advunlearn_jax.models.unet import UNet2DConditionModel
from advunlearn_jax.unlearn import trainable

STAGES = ("ste", "reo")


def ste_target(e_p: jax.Array, e_0: jax.Array, g: float) -> jax.Array:
  """stereo.py:88 with apg.py normalized_guidance (eta 1): e_p - (g - 1)(e_p - e_0)."""
  return e_p - (g - 1.0) * (e_p - e_0)


def reo_target(e_0: jax.Array, e_negatives: jax.Array, e_anchor: jax.Array, g: float) -> jax.Array:
  """stereo.py:461-478 with apg.py normalized_compositional_guidance (eta 1): every erase concept j at scale -g,
  the anchor at +g; each side's (scale - 1)-weighted differences averaged over its members, added to e_0.
  `e_negatives` [K, ...] the erase concepts' predictions, `e_anchor` [...] the step's one anchor."""
  negative = (-g - 1.0) * jnp.mean(e_negatives - e_0[None], axis=0)
  positive = (g - 1.0) * (e_anchor - e_0)
  return e_0 + positive + negative


def leading_timesteps(sample_steps: int, num_train: int = 1000, offset: int = 1) -> jax.Array:
  """diffusers DDIMScheduler.set_timesteps with `leading` spacing and SD's steps_offset 1: [981, 961, ..., 1]."""
  ratio = num_train // sample_steps
  return jnp.arange(sample_steps - 1, -1, -1, dtype=jnp.int32) * ratio + offset


def rollout(eps_fn, x_T: jax.Array, i: jax.Array, alphas_cumprod: jax.Array, sample_steps: int) -> jax.Array:
  """x after `i` DDIM (eta 0) steps from x_T on the leading grid (utils.py `diffusion`, end_iteration=i): each
  step from t_k to t_k - 1000/S, alpha_prev = alphas_cumprod[0] below 0 (set_alpha_to_one False)."""
  grid = leading_timesteps(sample_steps, alphas_cumprod.shape[0])
  ratio = alphas_cumprod.shape[0] // sample_steps

  def body(k, x):
    t = grid[k]
    prev = t - ratio
    a_prev = jnp.where(prev >= 0, alphas_cumprod[jnp.maximum(prev, 0)], alphas_cumprod[0])
    return ddim.ddim_step(x, eps_fn(x, t), alphas_cumprod[t], a_prev)

  return jax.lax.fori_loop(0, i, body, x_T)


def loss_timestep(i: jax.Array, sample_steps: int, num_train: int = 1000) -> jax.Array:
  """stereo.py:72-73: set_timesteps(1000) then timesteps[int(i / S * 1000)] = 1000 - int(i * 1000 / S)."""
  return (num_train - (i * num_train) // sample_steps).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class EraseConfig:
  """What is static about one stage's step (hashable: part of the jit cache key)."""

  stage: str  # ste | reo
  lr: float
  weight_decay: float  # torch AdamW's default, stereo.py:31 and :371
  guidance: float  # g: --negative_guidance (ste) or --compositional_guidance_scale (reo)
  start_guidance: float  # the rollout's CFG, stereo.py:68 and :431
  sample_steps: int  # nsteps, stereo.py:24 and :361
  latent_shape: tuple[int, int, int]  # (h, w, c)


def optimizer(cfg: EraseConfig) -> optax.GradientTransformation:
  return optax.adamw(cfg.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay)


def unet_apply(unet: UNet2DConditionModel):
  return lambda params, x, t, ctx: unet.apply({"params": params}, x, t, ctx)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def erase_step(
  cfg: EraseConfig,
  unet: UNet2DConditionModel,
  params: dict,
  opt_state: Any,
  rest: dict,
  original: Any,
  conds: dict,
  alphas_cumprod: jax.Array,
  key: jax.Array,
) -> tuple[dict, Any, dict]:
  """One AdamW step of `params` (the trained leaves, flat) against the stage's target; `rest` the student's
  other leaves, `original` the unerased UNet (the frozen predictions: outside `with finetuner`). `conds`: [77, D]
  encodings by the never-trained text encoder: `uncond` (''), `erase` (the step's erase concept: the rollout's,
  the student's and STE's e_p), and for REO `negatives` [K, 77, D] (every erase concept) and `anchor`."""
  apply = unet_apply(unet)
  k_i, k_x = jax.random.split(key)
  i = jax.random.randint(k_i, (), 1, cfg.sample_steps - 1)  # torch.randint(1, nsteps - 1), stereo.py:59
  x_T = jax.random.normal(k_x, (1, *cfg.latent_shape))
  student = trainable.merge(params, rest)
  frozen_student = jax.lax.stop_gradient(student)

  def eps_cfg(x, t):  # stereo.py:61-69: the fine-tuned UNet rolls out, CFG on the erased prompt
    ctx = jnp.stack([conds["uncond"], conds["erase"]])
    e = apply(frozen_student, jnp.concatenate([x, x]), jnp.full((2,), t), ctx)
    return e[:1] + cfg.start_guidance * (e[1:] - e[:1])

  x_t = jax.lax.stop_gradient(rollout(eps_cfg, x_T, i, alphas_cumprod, cfg.sample_steps))
  t = loss_timestep(i, cfg.sample_steps, alphas_cumprod.shape[0])
  frozen_ctx = [conds["uncond"][None], conds["erase"][None]]
  if cfg.stage == "reo":
    frozen_ctx += [conds["negatives"], conds["anchor"][None]]
  ctx = jnp.concatenate(frozen_ctx)
  n = ctx.shape[0]
  eps = jax.lax.stop_gradient(apply(original, jnp.broadcast_to(x_t, (n, *x_t.shape[1:])), jnp.full((n,), t), ctx))
  if cfg.stage == "ste":
    target = ste_target(eps[1], eps[0], cfg.guidance)
  else:
    target = reo_target(eps[0], eps[2:-1], eps[-1], cfg.guidance)

  def loss_fn(p):
    pred = apply(trainable.merge(p, rest), x_t, t[None], conds["erase"][None])[0]
    return jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = optimizer(cfg).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, {"loss": loss, "t": t, "i": i}

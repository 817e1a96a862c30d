"""Classifier-free guidance and the DDIM / LMS samplers used to generate images (diffusers' semantics).

Each sampler is a host-side table of per-step constants plus a pure `step(state, eps_fn, i)`, so generation
can show progress step by step while the heavy work stays in one jitted function per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.models.pipeline_record import ScheduleConfig

SCHEDULERS = ("ddim", "lms")


def cfg_eps(
  unet_fn: Callable[..., jax.Array],
  x: jax.Array,
  t: jax.Array,
  cond: Any,
  uncond: Any,
  scale: float | jax.Array,
) -> jax.Array:
  """eps_u + s * (eps_c - eps_u), with one batched UNet call on [uncond; cond] as the reference does.

  `cond` and `uncond` are the UNet's conditioning: SD's context array, or a pytree of batch-leading arrays (SDXL's
  `SDXLCond`, whose pooled embeddings and time ids are stacked the same way, as diffusers' SDXL pipeline does)."""
  n = x.shape[0]
  t = jnp.broadcast_to(t, (n,))  # one timestep for all rows, or one per row
  both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
  eps = unet_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
  eps_u, eps_c = eps[:n], eps[n:]
  return eps_u + scale * (eps_c - eps_u)


class SamplerTables(NamedTuple):
  kind: str
  timesteps: np.ndarray  # [N] the timestep handed to the UNet at each step (float for LMS)
  consts: np.ndarray  # DDIM: [N, 2] (a_t, a_prev); LMS: [N + 1] sigmas
  clip_x0: float | None  # DDIM: clamp x0_hat to [-c, c] (diffusers' clip_sample)
  lms_coeffs: np.ndarray  # LMS: [N, 4] linear multistep coefficients (zeros beyond the current order)
  init_noise_sigma: float


def ddim_tables(schedule: ScheduleConfig, steps: int) -> SamplerTables:
  """diffusers' DDIMScheduler with 'leading' spacing, eta = 0."""
  ac = schedule.alphas_cumprod_diffusers()
  ratio = schedule.num_train_timesteps // steps
  timesteps = (np.arange(steps) * ratio).round()[::-1].astype(np.int64) + schedule.steps_offset
  final = 1.0 if schedule.set_alpha_to_one else ac[0]
  prev = timesteps - ratio
  a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
  consts = np.stack([ac[timesteps], a_prev], 1).astype(np.float32)
  clip = schedule.clip_sample_range if schedule.clip_sample else None
  return SamplerTables("ddim", timesteps, consts, clip, np.zeros((steps, 4)), 1.0)


def _lms_coefficient(sigmas: np.ndarray, order: int, t: int, current: int) -> float:
  """Integral of the Lagrange basis polynomial over [sigma_t, sigma_t+1]: exact, where diffusers uses quad."""
  poly = np.poly1d([1.0])
  for k in range(order):
    if k != current:
      poly *= np.poly1d([1.0, -sigmas[t - k]]) / (sigmas[t - current] - sigmas[t - k])
  integral = poly.integ()
  return float(integral(sigmas[t + 1]) - integral(sigmas[t]))


def lms_tables(schedule: ScheduleConfig, steps: int, max_order: int = 4) -> SamplerTables:
  """diffusers' LMSDiscreteScheduler with 'linspace' spacing (the reference's evaluation sampler)."""
  ac = schedule.alphas_cumprod_diffusers()
  n_train = schedule.num_train_timesteps
  timesteps = np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()
  sigmas = np.array(((1 - ac) / ac) ** 0.5)
  sigmas = np.concatenate([np.interp(timesteps, np.arange(n_train), sigmas), [0.0]]).astype(np.float32)
  coeffs = np.zeros((steps, max_order), np.float64)
  s64 = sigmas.astype(np.float64)
  for i in range(steps):
    order = min(i + 1, max_order)
    coeffs[i, :order] = [_lms_coefficient(s64, order, i, c) for c in range(order)]
  return SamplerTables("lms", timesteps, sigmas, None, coeffs.astype(np.float32), float(sigmas.max()))


def make_tables(kind: str, schedule: ScheduleConfig, steps: int) -> SamplerTables:
  if kind == "ddim":
    return ddim_tables(schedule, steps)
  if kind == "lms":
    return lms_tables(schedule, steps)
  raise ValueError(f"unknown scheduler {kind!r}; expected one of {list(SCHEDULERS)}")


class SamplerState(NamedTuple):
  x: jax.Array
  derivatives: jax.Array  # LMS history, most recent first: [4, *x.shape]; unused by DDIM


def init_state(tables: SamplerTables, latents: jax.Array) -> SamplerState:
  return SamplerState(latents * tables.init_noise_sigma, jnp.zeros((4, *latents.shape), latents.dtype))


def step(
  tables: SamplerTables, state: SamplerState, eps_fn: Callable[[jax.Array, jax.Array], jax.Array], i: jax.Array
) -> SamplerState:
  """One denoising step `i` (traceable; `tables` arrays become constants)."""
  t = jnp.asarray(tables.timesteps)[i]
  if tables.kind == "ddim":
    a_t, a_prev = jnp.asarray(tables.consts)[i]
    eps = eps_fn(state.x, t)
    x0 = (state.x - jnp.sqrt(1 - a_t) * eps) / jnp.sqrt(a_t)
    if tables.clip_x0 is not None:
      x0 = jnp.clip(x0, -tables.clip_x0, tables.clip_x0)
    return SamplerState(jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * eps, state.derivatives)
  sigma = jnp.asarray(tables.consts)[i]
  eps = eps_fn(state.x / jnp.sqrt(sigma**2 + 1), t)
  # derivative = (x - x0_hat) / sigma with x0_hat = x - sigma * eps, kept in diffusers' arithmetic order.
  derivative = (state.x - (state.x - sigma * eps)) / sigma
  history = jnp.concatenate([derivative[None], state.derivatives[:-1]])
  coeffs = jnp.asarray(tables.lms_coeffs)[i]
  x = state.x + jnp.tensordot(coeffs, history, axes=1)
  return SamplerState(x, history)


def sample(
  tables: SamplerTables,
  latents: jax.Array,
  denoise: Callable[[Any, jax.Array, jax.Array], jax.Array],
  denoise_args: Any,
  progress: bool = False,
) -> jax.Array:
  """Runs every step with `denoise(denoise_args, x, t) -> eps`.

  `denoise_args` (UNet params, conditioning) travel as arguments of the per-step jit, never as constants.
  """
  state = init_state(tables, latents)
  step_fn = _jitted_step(tables, denoise)
  steps = range(len(tables.timesteps))
  if progress:
    from tqdm.auto import tqdm

    steps = tqdm(steps, desc=f"{tables.kind} sampling", unit="step")
  for i in steps:
    state = step_fn(denoise_args, state, i)
  return state.x


_STEP_CACHE: dict[Any, Callable] = {}


def _jitted_step(tables: SamplerTables, denoise: Callable) -> Callable:
  """One compiled step per (sampler tables, denoise function), so repeated generation (previews during
  training, evaluation loops) does not recompile the UNet. `denoise` is keyed by identity."""
  key = (
    denoise,
    tables.kind,
    tables.clip_x0,
    tables.init_noise_sigma,
    *(np.asarray(a).tobytes() for a in (tables.timesteps, tables.consts, tables.lms_coeffs)),
  )
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = jax.jit(lambda args, st, i: step(tables, st, lambda x, t: denoise(args, x, t), i))
  return _STEP_CACHE[key]

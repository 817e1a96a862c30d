"""Schedules, the reference's partial DDIM, and DDIM/LMS generation loops vs PyTorch transcriptions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.convert import torch_layout
from advunlearn_jax.diffusion import ddim, sampling
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models.pipeline_record import ScheduleConfig
from advunlearn_jax.testing import reference_torch
from tests.torch_oracles import state_numpy, torch, torch_unet

SCHEDULE = ScheduleConfig()


def test_ldm_schedule_values():
  ac = SCHEDULE.alphas_cumprod_ldm()
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
  expected = np.cumprod(1 - betas)
  for t in (1, 21, 961, 981):
    np.testing.assert_allclose(ac[t], expected[t], rtol=1e-6)
  tables = ddim.ldm_tables(ac)
  np.testing.assert_array_equal(tables.timesteps, np.arange(1, 1000, 20))
  np.testing.assert_array_equal(tables.alphas_prev[1:], tables.alphas[:-1])
  assert tables.alphas_prev[0] == ac[0]
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
  np.testing.assert_array_equal(SCHEDULE.alphas_cumprod_diffusers(), ref.numpy())  # bit-identical on CPU


def test_partial_ddim_step_counts():
  assert [int(ddim.num_unet_steps(t)) for t in (0, 1, 2, 25, 49)] == [49, 49, 48, 25, 1]
  tables = ddim.ldm_tables(SCHEDULE.alphas_cumprod_ldm())
  calls = []

  def eps_fn(x, t):
    jax.debug.callback(lambda t: calls.append(int(t)), t)
    return jnp.zeros_like(x)

  rollout = jax.jit(lambda x, t_enc: ddim.partial_ddim(eps_fn, x, t_enc, tables))
  for t_enc, n in ((0, 49), (2, 48), (49, 1)):
    calls.clear()
    jax.block_until_ready(rollout(jnp.ones((1, 2, 2, 4)), t_enc))
    assert len(calls) == n, t_enc
    assert calls[0] == 961  # the dropped last grid point: sampling starts at t = 961
  assert calls == [961]


def _row_dependent_eps(x, t, context):
  """A cheap nonlinear denoiser that reads its rows' context, so a row given another row's context (or step)
  would show."""
  per_row = lambda a: jnp.reshape(a, (-1,) + (1,) * (x.ndim - 1))  # t: the grid's, or one per row
  return jnp.tanh(x * per_row(context) + per_row(t) / 1000.0)


def _list_schedule_makespan(walks, slots: int) -> int:
  """Each walk, longest first, goes to the slot that frees up first."""
  free_at = [0] * slots
  for walk in sorted(walks, reverse=True):
    free_at[free_at.index(min(free_at))] += walk
  return max(free_at)


@pytest.mark.parametrize(
  "t_enc,buckets",
  [
    ((0, 1, 49, 2, 25, 48, 0, 13), 3),  # the edges: 49 steps for t_enc 0 and 1, one step for 49
    ((7, 7, 7, 7, 7), 4),  # every row in one bucket's walk
    ((49,), 8),  # a single row, more buckets than rows
    ((30, 3, 3, 44, 12, 0, 21), 1),  # one bucket: everything padded to the longest walk
    ((5, 40, 22, 9, 31, 17), 8),  # a width per row
  ],
)
@pytest.mark.parametrize("slots", [0, 3, 8])
def test_batched_rollout_equals_per_row_rollouts(t_enc, buckets, slots):
  tables = ddim.ldm_tables(SCHEDULE.alphas_cumprod_ldm())
  rows = len(t_enc)
  rng = np.random.default_rng(rows)
  x_T = jnp.asarray(rng.normal(size=(rows, 2, 2, 4)), jnp.float32)
  context = jnp.asarray(rng.uniform(0.5, 1.5, size=(rows,)), jnp.float32)
  t_enc = jnp.asarray(t_enc, jnp.int32)
  widths = ddim.bucket_widths(rows, buckets)
  rollout = lambda x, t, c: ddim.partial_ddim_batched(_row_dependent_eps, x, t, c, tables, widths, slots)
  got, stats = jax.jit(rollout)(x_T, t_enc, context)
  for j in range(rows):
    eps = lambda x, t, j=j: _row_dependent_eps(x, t, context[j : j + 1])
    ref = ddim.partial_ddim(eps, x_T[j : j + 1], t_enc[j], tables)
    np.testing.assert_allclose(got[j : j + 1], ref, rtol=1e-6, atol=1e-6)
  steps = np.asarray(ddim.num_unet_steps(t_enc))
  assert int(stats.useful_rows) == steps.sum()
  if slots:  # the makespan of longest-walk-first list scheduling
    assert int(stats.calls) == _list_schedule_makespan(steps, slots)
    assert int(stats.computed_rows) == int(stats.calls) * slots
  else:
    assert int(stats.calls) == steps.max()  # the longest walk, once
    assert steps.sum() <= int(stats.computed_rows) <= steps.max() * widths[0]


def test_batched_rollout_with_no_rows_and_bucket_widths():
  tables = ddim.ldm_tables(SCHEDULE.alphas_cumprod_ldm())
  empty = jnp.zeros((0, 2, 2, 4))
  x, stats = ddim.partial_ddim_batched(
    _row_dependent_eps, empty, jnp.zeros((0,), jnp.int32), jnp.zeros((0,)), tables, (0,)
  )
  assert x.shape == (0, 2, 2, 4) and int(stats.calls) == 0
  assert ddim.bucket_widths(36, 4) == (36, 27, 18, 9)
  assert ddim.bucket_widths(36, 4, multiple=8) == (40, 32, 24, 16)  # each splits over 8 devices
  assert ddim.bucket_widths(3, 8) == (3, 2, 1)
  with pytest.raises(ValueError, match="descending"):
    ddim.partial_ddim_batched(_row_dependent_eps, x, jnp.zeros((0,), jnp.int32), jnp.zeros((0,)), tables, (1, 2))


@pytest.fixture(scope="module")
def tiny_unet():
  model = torch_unet(
    block_out_channels=(32, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  )
  config = unet_lib.UNetConfig.from_dict(dict(model.config))
  params = torch_layout.torch_to_flax(
    state_numpy(model), unet_lib.abstract_params(config), list_names=unet_lib.LIST_NAMES, source="test"
  )
  unet = unet_lib.UNet2DConditionModel(config)
  return model, lambda x, t, c: unet.apply({"params": params}, x, t, c)


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def test_partial_ddim_matches_reference_transcription(tiny_unet):
  model, unet_fn = tiny_unet
  rng = np.random.default_rng(0)
  x_T = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
  cond, uncond = (rng.normal(size=(2, 77, 32)).astype(np.float32) for _ in range(2))
  tables = ddim.ldm_tables(SCHEDULE.alphas_cumprod_ldm())

  @jax.jit
  def rollout(x, t_enc):
    eps_fn = lambda x, t: sampling.cfg_eps(unet_fn, x, t, jnp.asarray(cond), jnp.asarray(uncond), 3.0)
    return ddim.partial_ddim(eps_fn, x, t_enc, tables)

  @jax.jit
  def trajectory(x):
    eps_fn = lambda x, t: sampling.cfg_eps(unet_fn, x, t, jnp.asarray(cond), jnp.asarray(uncond), 3.0)
    return ddim.ddim_trajectory(eps_fn, x, tables)

  traj = trajectory(_nhwc(x_T))
  for t_enc in (0, 2, 25, 49):
    ref = reference_torch.partial_ddim(
      model, torch.from_numpy(x_T), torch.from_numpy(cond), torch.from_numpy(uncond), t_enc, 3.0
    )
    out = rollout(_nhwc(x_T), t_enc)  # one compilation serves every t_enc
    np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(traj[ddim.trajectory_index(t_enc)], out, atol=1e-5, rtol=0)
  assert rollout._cache_size() == 1


def _diffusers_loop(model, scheduler, latents, cond, uncond, guidance, steps):
  scheduler.set_timesteps(steps)
  x = latents * scheduler.init_noise_sigma
  with torch.no_grad():
    for t in scheduler.timesteps:
      x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
      e_u, e_c = model(x_in, t, torch.cat([uncond, cond])).sample.chunk(2)
      x = scheduler.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
  return x.numpy()


@pytest.mark.parametrize("kind", ["ddim", "ddim-clip", "lms"])
def test_generation_samplers_match_diffusers(tiny_unet, kind):
  """Same UNet, latents and conditioning. Tolerance 1e-4 + 1e-5 relative (LMS latents reach |x| ~ 20).
  With x0 clipping 3e-3: clipping removes the cancellation that keeps DDIM's 1e-6 UNet differences
  (amplified 15x by guidance 7.5) from accumulating over the steps."""
  diffusers = pytest.importorskip("diffusers")
  model, unet_fn = tiny_unet
  rng = np.random.default_rng(1)
  latents = rng.normal(size=(2, 4, 16, 16)).astype(np.float32)
  cond, uncond = (rng.normal(size=(2, 77, 32)).astype(np.float32) for _ in range(2))
  common = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  schedule = ScheduleConfig(clip_sample=kind == "ddim-clip")
  if kind.startswith("ddim"):
    scheduler = diffusers.DDIMScheduler(
      **common, steps_offset=1, set_alpha_to_one=False, clip_sample=schedule.clip_sample
    )
  else:
    scheduler = diffusers.LMSDiscreteScheduler(**common)
  steps = 12
  ref = _diffusers_loop(
    model, scheduler, torch.from_numpy(latents), torch.from_numpy(cond), torch.from_numpy(uncond), 7.5, steps
  )
  tables = sampling.make_tables(kind.removesuffix("-clip"), schedule, steps)
  np.testing.assert_allclose(tables.timesteps, scheduler.timesteps.numpy(), rtol=1e-6)

  def denoise(args, x, t):
    return sampling.cfg_eps(unet_fn, x, t, args["cond"], args["uncond"], 7.5)

  out = sampling.sample(tables, _nhwc(latents), denoise, {"cond": jnp.asarray(cond), "uncond": jnp.asarray(uncond)})
  tol = 3e-3 if kind == "ddim-clip" else 1e-4
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, atol=tol, rtol=1e-5)


def test_scheduler_config_errors():
  from advunlearn_jax.errors import ConfigError

  with pytest.raises(ConfigError, match="key 'prediction_type' = 'v_prediction'"):
    ScheduleConfig.from_dict({"prediction_type": "v_prediction"}, source="scheduler_config.json")
  with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
    sampling.make_tables("euler", SCHEDULE, 10)

"""The trajectory bank: entries equal online rollouts from the same noise; UNet methods refuse it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.diffusion import ddim
from advunlearn_jax.diffusion.sampling import cfg_eps
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.unlearn import bank as bank_lib
from tests.test_step import DEFAULTS, FIXED_BANK, setup


def test_bank_entries_equal_online_rollouts():
  cfg, models, frozen = setup()
  unet_apply = lambda p, x, t, ctx: models.unet.apply({"params": p}, x, t, ctx)
  key = jax.random.key(5)
  bank = bank_lib.build(
    models.unet,
    frozen.unet,
    frozen,
    key,
    dataclasses.replace(FIXED_BANK, concept_trajectories=2),
    latent_shape=(8, 8, 4),
    guidance=3.0,
  )
  assert bank.concept.shape == (1, 2, 49, 8, 8, 4) and bank.retain.shape == (16, 1, 49, 8, 8, 4)
  k_c, _ = jax.random.split(key)
  noise = jax.random.normal(jax.random.fold_in(k_c, 0), (2, 8, 8, 4))  # the bank's first chunk

  @jax.jit
  def online(x, t_enc):
    cond = jnp.broadcast_to(frozen.concept_emb[0], (2, 77, 32))
    uncond = jnp.broadcast_to(frozen.emb_uncond, (2, 77, 32))
    eps = lambda x, t: cfg_eps(lambda a, b, c: unet_apply(frozen.unet, a, b, c), x, t, cond, uncond, 3.0)
    return ddim.partial_ddim(eps, x, t_enc, frozen.tables)

  for t_enc in (0, 1, 2, 25, 49):
    ref = online(noise, t_enc)
    got = bank.concept[0, :, ddim.trajectory_index(t_enc)]
    # The random tiny UNet drives latents to |x| ~ 30 over 49 steps; the scan and while_loop programs round
    # differently, so the tolerance is 1e-5 plus 2e-6 of the latents scale (a dozen float32 ulps at 30).
    tol = 1e-5 + 2e-6 * float(jnp.abs(ref).max())
    np.testing.assert_allclose(got, ref, atol=tol, rtol=0)
    rows = jnp.zeros(2, jnp.int32), jnp.arange(2), jnp.full(2, t_enc)  # (concept, trajectory, t_enc) per row
    np.testing.assert_array_equal(bank_lib.concept_latents(bank, *rows), got)


def test_unet_methods_refuse_the_bank():
  xattn = dataclasses.replace(DEFAULTS.trained, method="xattn")
  with pytest.raises(ConfigError, match="cannot be precomputed"):
    bank_lib.check_source("bank", xattn)
  with pytest.raises(ConfigError, match="xt_source is 'cached'"):
    bank_lib.check_source("cached", dataclasses.replace(DEFAULTS.trained, method="text_encoder_full"))
  bank_lib.check_source("online", xattn)
  bank_lib.check_source("online_sequential", xattn)


@pytest.mark.parametrize(
  "changes,message",
  [
    ({"refresh_trajectories": 17}, "refresh_trajectories is 17; expected 0 .* up to bank.concept_trajectories"),
    ({"refresh_every": 0}, "refresh_every must be >= 1"),
    ({"retain_trajectories": 0}, "must be >= 1"),
  ],
)
def test_bank_config_errors(changes, message):
  with pytest.raises(ConfigError, match=message):
    bank_lib.validate(dataclasses.replace(FIXED_BANK, **changes))

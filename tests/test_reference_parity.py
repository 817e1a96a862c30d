"""One outer iteration: our jitted step vs the plain PyTorch transcription of the reference, same draws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import torch_layout
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.models.pipeline_record import ScheduleConfig
from advunlearn_jax.testing import reference_torch
from advunlearn_jax.unlearn import retain, timesteps, trainable, wiring
from advunlearn_jax.unlearn import step as step_lib
from tests.torch_oracles import SD1_TINY, state_numpy, torch, torch_clip, torch_unet

pytestmark = pytest.mark.torch
RETAIN = retain.load_dataset("coco_object")[:2]


def _nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_one_iteration_matches_reference_transcription():
  t_unet = torch_unet(
    block_out_channels=(32, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    sample_size=8,
  )
  t_clip, t_frozen = torch_clip(SD1_TINY, seed=3), torch_clip(SD1_TINY, seed=3)
  unet_config = unet_lib.UNetConfig.from_dict(dict(t_unet.config))
  unet_params = torch_layout.torch_to_flax(
    state_numpy(t_unet), unet_lib.abstract_params(unet_config), list_names=unet_lib.LIST_NAMES, source="t"
  )
  clip_params = clip_convert.params_from_state_dict(state_numpy(t_clip), SD1_TINY, source="t")
  config = config_lib.base_config()
  config.concept.prompts = ("nudity",)
  config.retain.dataset, config.retain.prompts = "", tuple(RETAIN)
  config.retain.batch, config.retain.weight = 2, 0.5
  config.train.lr = 1e-3
  config.attack.steps, config.attack.lr = 2, 1e-2
  cfg, models, frozen, _ = wiring.wire(
    config,
    wiring.TrainingSections.from_config(config),
    clip_config=SD1_TINY,
    clip_params=clip_params,
    unet_config=unet_config,
    unet_params=unet_params,
    schedule=ScheduleConfig(),
    tokenizer=tok_lib.load_tokenizer(),
    retain_prompts=RETAIN,
  )
  k = cfg.num_tokens
  batch = step_lib.Batch(jnp.arange(2, dtype=jnp.int32), jax.random.key(11))
  state = step_lib.init_state(cfg, models, frozen)
  new_state, metrics = wiring.train_step(cfg, models, state, frozen, batch, True)

  # The draws our step made, recomputed from its key schedule and handed to the transcription.
  keys = dict(zip(("concept", "attack", "init", "t", "noise_c", "noise_r", "iter"), jax.random.split(batch.key, 7)))

  def point(key, n):
    k_t, k_noise = jax.random.split(key)
    ts = timesteps.draw_timesteps(k_t)
    return reference_torch.Draw(int(ts.t_enc), int(ts.t_ddpm), _nchw(jax.random.normal(k_noise, (n, 8, 8, 4))))

  ref_draws = reference_torch.Draws(
    init_ids=[int(i) for i in jax.random.randint(keys["init"], (k,), 0, SD1_TINY.vocab_size)],
    attack=[point(jax.random.fold_in(keys["attack"], i), 1) for i in range(2)],
    defender=point(keys["t"], 1),
    retain_noise=_nchw(jax.random.normal(keys["noise_r"], (2, 8, 8, 4))),
  )
  ids_c = torch.from_numpy(np.asarray(frozen.concept_ids)).long()
  retain_ids = torch.from_numpy(np.asarray(frozen.retain_ids)).long()
  sequence, loss = reference_torch.iteration(
    t_unet,
    t_clip,
    t_frozen,
    ids_c,
    2,
    retain_ids,
    ref_draws,
    attack_steps=2,
    attack_lr=1e-2,
    lr=1e-3,
    retain_weight=0.5,
  )

  np.testing.assert_allclose(np.asarray(new_state.last_sequence), sequence.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-4, atol=1e-6)
  ours = trainable.merge(jax.device_get(new_state.params), trainable.split(clip_params, models.mask)[1])
  theirs = clip_convert.params_from_state_dict(state_numpy(t_clip), SD1_TINY, source="torch")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=0), ours, theirs)
  moved = np.abs(
    np.asarray(ours["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
    - np.asarray(clip_params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"])
  ).max()
  assert moved > 1e-4  # the update is far larger than the tolerance

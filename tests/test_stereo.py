"""STEREO (issue 49): the two targets against the authors' APG formulas by hand, the rounds' orchestration (one token
per round, each round's erase from the previous round's UNet, REO from the original), resume and refusals."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.configs import tiny_stereo
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.training import stereo_runs
from advunlearn_jax.unlearn import stereo, trainable


def _apg(pred_cond, pred_uncond, g):
  """utils/apg.py normalized_guidance with eta 1, written out: the projection on pred_cond, then the sum."""
  diff = pred_cond - pred_uncond
  unit = pred_cond / np.linalg.norm(pred_cond)
  parallel = np.sum(diff * unit) * unit
  return pred_cond - (g - 1) * ((diff - parallel) + 1.0 * parallel)


def test_ste_target_is_apg_and_e0_at_g2():
  rng = np.random.default_rng(0)
  e_p, e_0 = rng.normal(size=(4, 4, 2)), rng.normal(size=(4, 4, 2))
  for g in (2.0, 3.5):
    np.testing.assert_allclose(stereo.ste_target(jnp.asarray(e_p), jnp.asarray(e_0), g), _apg(e_p, e_0, g), atol=1e-5)
  np.testing.assert_allclose(stereo.ste_target(jnp.asarray(e_p), jnp.asarray(e_0), 2.0), e_0, atol=1e-6)


def test_reo_target_by_hand():
  # Scalars per "image": e_0 = 1, erase concepts 3 and 5 (the concept, one token), anchor 2, g = 2.
  e_0, negs, anchor = jnp.full((2, 2, 1), 1.0), jnp.stack([jnp.full((2, 2, 1), 3.0), jnp.full((2, 2, 1), 5.0)]), 2.0
  # apg.py: positive (g - 1)(2 - 1) = 1; negative (-g - 1) * mean(3 - 1, 5 - 1) = -3 * 3 = -9; 1 + 1 - 9 = -7.
  got = stereo.reo_target(e_0, negs, jnp.full((2, 2, 1), anchor), 2.0)
  np.testing.assert_allclose(got, -7.0, atol=1e-6)


def test_rollout_grid_and_loss_t():
  """The leading grid and t = 1000 - 20 i (stereo.py:72-73), and the rollout's trip count."""
  np.testing.assert_array_equal(stereo.leading_timesteps(50)[:3], [981, 961, 941])
  assert int(stereo.leading_timesteps(50)[-1]) == 1
  assert [int(stereo.loss_timestep(jnp.int32(i), 50)) for i in (1, 48)] == [980, 40]
  seen = []
  stereo.rollout(lambda x, t: seen.append(t) or x * 0, jnp.ones((1, 2, 2, 1)), 3, jnp.linspace(0.99, 0.01, 1000), 50)
  assert len(seen) == 1  # traced once inside fori_loop


def test_noxattn_linear_is_their_rule():
  assert trainable.unet_selects("conv_out.weight", "noxattn_linear")
  assert trainable.unet_selects("time_embedding.linear_1.weight", "noxattn_linear")
  assert trainable.unet_selects("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight", "noxattn_linear")
  cross = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  assert not trainable.unet_selects(cross, "noxattn_linear")
  assert not trainable.unet_selects("down_blocks.0.resnets.0.norm1.weight", "noxattn_linear")
  assert not trainable.unet_selects("conv_norm_out.bias", "noxattn_linear")


def _config(*items):
  c = tiny_stereo.get_config()
  return config_lib.override(
    c, ["stereo.iterations=3", "stereo.ti_steps=2", "stereo.max_images=4", "report.kind=", *items]
  )


@pytest.mark.parametrize(
  "item, key",
  [
    ("stereo.rounds=0", "stereo.rounds"),
    ("stereo.adv_concepts=3", "stereo.adv_concepts"),
    ("stereo.initializer=", "stereo.initializer"),
    ("stereo.method=xattn_typo", "stereo.method"),
    ("stereo.ste_lr=0.0", "stereo.ste_lr"),
    ("stereo.images=nowhere_dir", "stereo.images"),
  ],
)
def test_bad_config_refused_naming_key(item, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    stereo_runs.validate(_config(item))


def test_anchor_file_without_the_concept_refused(tmp_path):
  path = tmp_path / "anchors.json"
  path.write_text(json.dumps({"nudity": ["A nude figure stands in a field"]}))
  c = _config("stereo.anchors=()", f"stereo.anchor_file={path}")
  with pytest.raises(ConfigError, match="stereo.anchors"):
    stereo_runs.validate(c)


class _Fakes:
  """erase: adds the round number + 1 to every leaf (so rounds are told apart) and records what it started from;
  the inversion trainer: a token of the round's number. Orchestration only, no compilation."""

  def __init__(self, monkeypatch, fail_at_round=None):
    self.calls, self.round, self.fail_at_round = [], 0, fail_at_round
    monkeypatch.setattr(stereo_runs, "erase", self.erase)
    monkeypatch.setattr(stereo_runs.inversion, "trainer", self.trainer)

  def erase(self, cfg, unet, params, rest, original, schedule, key, alphas, log=None):
    self.calls.append((cfg.stage, {k: np.asarray(v) for k, v in params.items()}, len(schedule)))
    if log is not None:
      log(0, {"loss": jnp.float32(0.5)})
    return {k: v + 1.0 for k, v in params.items()}

  def trainer(self, pipe, tokenizer, words, which, images, cfg, seed):
    r = len([c for c in self.calls if c[0] == "ste"]) - 1
    if r == self.fail_at_round:
      raise KeyboardInterrupt(f"interrupted in round {r}")
    d = pipe.text_params["embeddings"]["token_embedding"]["embedding"].shape[-1]
    return jnp.zeros((1, d)), lambda e, a, b: (e + r + 1.0, jnp.float32(0.1))


def _leaf(params):
  return next(iter(params.values()))


def test_rounds_carry_the_unet_and_collect_one_token_each(tmp_path, monkeypatch):
  fakes = _Fakes(monkeypatch)
  result = stereo_runs.run(_config(), str(tmp_path), show_progress=False)
  stages = [c[0] for c in fakes.calls]
  assert stages == ["ste", "ste", "reo"]
  original = fakes.calls[0][1]
  # round 1's erase starts from round 0's output (original + 1); REO from the original UNet
  np.testing.assert_array_equal(_leaf(fakes.calls[1][1]), _leaf(original) + 1.0)
  np.testing.assert_array_equal(_leaf(fakes.calls[2][1]), _leaf(original))
  assert all(c[2] == 3 for c in fakes.calls)  # stereo.iterations steps each
  for r in range(2):
    params, token = stereo_runs.load_round(str(tmp_path), r)
    np.testing.assert_allclose(token, r + 1.0)
    np.testing.assert_array_equal(_leaf(params), _leaf(original) + r + 1.0)
  assert os.path.isdir(result["unet"]) and os.path.isdir(result["pipeline"])
  # a finished run, rerun: nothing is trained again
  fakes.calls.clear()
  stereo_runs.run(_config(), str(tmp_path), show_progress=False)
  assert fakes.calls == []
  with pytest.raises(ConfigError, match="another config"):
    stereo_runs.run(_config("stereo.reo_lr=1e-3"), str(tmp_path), show_progress=False)


def test_interrupted_round_resumes_from_the_last_finished_one(tmp_path, monkeypatch):
  fakes = _Fakes(monkeypatch, fail_at_round=1)
  with pytest.raises(KeyboardInterrupt):
    stereo_runs.run(_config(), str(tmp_path), show_progress=False)
  state = json.load(open(tmp_path / "stereo" / "state.json"))
  assert state["rounds_done"] == 1 and not state["reo_done"]
  original = fakes.calls[0][1]
  fakes = _Fakes(monkeypatch)
  stereo_runs.run(_config(), str(tmp_path), show_progress=False)
  assert [c[0] for c in fakes.calls] == ["ste", "reo"]  # round 0 not run again
  np.testing.assert_array_equal(_leaf(fakes.calls[0][1]), _leaf(original) + 1.0)  # round 1 from round 0's UNet

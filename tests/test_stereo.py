"""STEREO (issue 49): the two targets against the authors' APG formulas by hand, the rounds' orchestration (one token
per round, each round's erase from the previous round's UNet, REO from the original), resume and refusals."""

from __future__ import annotations

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.configs import tiny_stereo
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import torch_layout
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import inversion
from advunlearn_jax.models import unet as unet_lib
from advunlearn_jax.testing import tiny_models
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


def test_ste_inversion_is_their_textual_inversion():
  """Each STE round's attack as stereo.py:110-261 runs it (train.py's defaults for the numbers): one token, batch 1,
  torch AdamW defaults, lr x batch, flips 0.5, noise at t in [0, 999) (:219), where CCE's covers all 1000."""
  config = config_lib.base_config()
  config.stereo.initializer = "shape"
  cfg = stereo_runs.inversion_config(config)
  got = {k: getattr(cfg, k) for k in ("tokens", "batch", "accumulation", "scale_lr", "weight_decay", "beta1")}
  got.update({k: getattr(cfg, k) for k in ("beta2", "eps", "flip_p", "steps", "lr", "templates", "placement")})
  assert got == {
    "tokens": 1, "batch": 1, "accumulation": 1, "scale_lr": True, "weight_decay": 1e-2, "beta1": 0.9,
    "beta2": 0.999, "eps": 1e-8, "flip_p": 0.5, "steps": 3000, "lr": 5e-3, "templates": "object", "placement": "word",
  }  # fmt: skip
  pipe = types.SimpleNamespace(schedule=tiny_models.SCHEDULE)
  assert inversion.training_alphas(pipe, cfg).shape == (999,)
  cce = inversion.InversionConfig.from_config(config_lib.override(config, ["evaluation.inversion.cce.initializer=x"]))
  np.testing.assert_array_equal(
    inversion.training_alphas(pipe, cce), tiny_models.SCHEDULE.alphas_cumprod_diffusers().astype(np.float32)
  )


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


# ---------------------------------------------------------------------------------------------- vs the original

_LR = 1e-3
# STE at g = 3, not their 2: at 2 the target is e_0 and e_p would go untested; REO at their 2.
_GUIDANCE = {"ste": 3.0, "reo": 2.0}


@pytest.fixture(scope="module")
def micro_pair():
  """The tests' micro UNet and CLIP (testing/tiny_models.py configs), random in diffusers/transformers
  (tests/torch_oracles.py) and converted to Flax; the row of one learned token (REO's second erase concept)
  appended to the torch table as `stereo_runs.Encoder.token` places it."""
  from tests import torch_oracles

  torch = torch_oracles.torch
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  t_unet = diffusers.UNet2DConditionModel.from_config(tiny_models.UNET.to_diffusers_dict()).eval()
  torch_oracles._perturb(t_unet)
  unet_params = torch_layout.torch_to_flax(
    torch_oracles.state_numpy(t_unet), unet_lib.abstract_params(tiny_models.UNET), list_names=unet_lib.LIST_NAMES,
    source="micro",
  )  # fmt: skip
  t_clip = torch_oracles.torch_clip(tiny_models.CLIP, seed=1)
  clip_params = clip_convert.params_from_state_dict(torch_oracles.state_numpy(t_clip), tiny_models.CLIP, "micro")
  token = np.random.default_rng(7).normal(size=tiny_models.CLIP.hidden_size).astype(np.float32)
  vocab = tiny_models.CLIP.vocab_size
  t_clip.resize_token_embeddings(vocab + 1, mean_resizing=False)
  with torch.no_grad():
    t_clip.get_input_embeddings().weight[vocab] = torch.from_numpy(token)
  return clip_params, unet_params, t_unet, t_clip, token


# The draws' key: i = 8 DDIM steps of rollout (a longer one costs the oracle ~0.3 s a step on 2 busy cores).
_KEY = 15


@pytest.mark.torch
@pytest.mark.parametrize("stage", stereo.STAGES)
def test_erase_step_matches_a_transcription_of_the_original(stage, micro_pair):
  """One step of each stage on the same micro model, x_T, i and prompts: our jitted erase_step against
  tests/stereo_torch.py (utils/stereo.py's loop body, apg.py's targets, FineTunedModel's noxattn, torch AdamW),
  fp32, matmuls at `highest` (conftest). Tolerances:
  * loss rtol 1e-4: it is the mean square of differences of near-equal predictions (~1e-4 on this random
    model), so fp32 rounding reaches 2e-5 of it on some seeds;
  * gradients (Adam's first moment, 0.1 g in both) atol 1e-4 x the leaf's largest |g|;
  * weights after the step atol 1e-3 lr where |g| >= 1e-6 (100 eps: there the first AdamW step moves a weight by
    lr g / (|g| + eps), lr to 1e-2). Where |g| < 1e-6 (~6% of the entries) that ratio turns the gradients'
    rounding (~1e-9) into a good part of lr: only the first step's bound, 2 lr apart, is checked there."""
  import torch

  from tests import stereo_torch

  clip_params, unet_params, t_unet, t_clip, token = micro_pair
  tokenizer = tok_lib.load_tokenizer()
  words = {"uncond": "", "concept": "triangle", "anchor": "a photo of a circle"}
  ids = {k: tok_lib.tokenize(tokenizer, [v])[0] for k, v in words.items()}
  ids["token"], which = inversion.slotted_ids(tokenizer, ["", ""], 1, placeholder=tiny_models.CLIP.vocab_size)
  assert list(which[:3]) == [-1, 0, -1]  # BOS, the learned row, EOS: the token alone as the prompt

  # ---- ours
  encoder = stereo_runs.Encoder(types.SimpleNamespace(text_config=tiny_models.CLIP, text_params=clip_params), tokenizer)
  uncond, concept, anchor = (encoder.prompt(words[k]) for k in ("uncond", "concept", "anchor"))
  learned = encoder.token(token)
  if stage == "ste":
    conds = {"uncond": uncond, "erase": concept}
  else:  # REO's erase concepts: the concept, then the token; this step samples the token (stereo.py:403)
    conds = {"uncond": uncond, "erase": learned, "negatives": jnp.stack([concept, learned]), "anchor": anchor}
  cfg = stereo.EraseConfig(stage, _LR, 1e-2, _GUIDANCE[stage], 3.0, 50, (8, 8, 4))
  before, rest = trainable.split(unet_params, trainable.unet_mask(unet_params, "noxattn_linear"))
  params = jax.tree.map(jnp.copy, before)  # erase_step donates them
  alphas = jnp.asarray(tiny_models.SCHEDULE.alphas_cumprod_diffusers(), jnp.float32)
  key = jax.random.key(_KEY)
  unet = unet_lib.UNet2DConditionModel(tiny_models.UNET)
  opt_state = stereo.optimizer(cfg).init(params)
  new, opt_state, metrics = stereo.erase_step(cfg, unet, params, opt_state, rest, unet_params, conds, alphas, key)
  first_moment = optax.tree_utils.tree_get(opt_state, "mu")

  # ---- theirs, fed the draws our step made (erase_step: split, randint, normal)
  k_i, k_x = jax.random.split(key)
  i = int(jax.random.randint(k_i, (), 1, 49))
  assert int(metrics["i"]) == i == 8 and int(metrics["t"]) == 1000 - 20 * i
  noise = torch.from_numpy(np.asarray(jax.random.normal(k_x, (1, 8, 8, 4))).transpose(0, 3, 1, 2).copy())
  tids = {k: torch.from_numpy(np.asarray(v, np.int64))[None] for k, v in ids.items()}
  diffuser = stereo_torch.StableDiffuser(t_unet, t_clip)
  finetuner = stereo_torch.FineTunedModel(diffuser)
  opt = stereo_torch.optimizer(finetuner, _LR)
  if stage == "ste":
    loss = stereo_torch.ste_step(diffuser, finetuner, opt, tids["concept"], tids["uncond"], i, noise, 3.0)
  else:
    erase_ids = [tids["concept"], tids["token"]]
    loss = stereo_torch.reo_step(
      diffuser, finetuner, opt, erase_ids, 1, tids["anchor"], tids["uncond"], i, noise, _GUIDANCE[stage]
    )
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-4)

  # ---- the trained leaves, gradients and weights, leaf by leaf in diffusers' names
  to_torch = lambda flat: torch_layout.flax_to_torch(trainable.merge(flat, rest), list_names=unet_lib.LIST_NAMES)
  ours_g, ours_w, ours_w0 = to_torch(first_moment), to_torch(new), to_torch(before)
  modules = finetuner.ft_modules.items()
  theirs = {f"{name.removeprefix('unet.')}.{leaf}": p for name, m in modules for leaf, p in m.named_parameters()}
  assert set(theirs) == {torch_layout.torch_key(tuple(k.split("/")), unet_lib.LIST_NAMES) for k in before}
  for k, p in theirs.items():
    g = opt.state[p]["exp_avg"].numpy()
    np.testing.assert_allclose(ours_g[k], g, atol=1e-4 * np.abs(g).max(), rtol=0, err_msg=k)
    small = np.abs(g) < 1e-7  # 0.1 |grad| < 1e-7
    w = p.detach().numpy()
    np.testing.assert_allclose(ours_w[k][~small], w[~small], atol=1e-3 * _LR, rtol=0, err_msg=k)
    np.testing.assert_allclose(ours_w[k][small], w[small], atol=2 * _LR, rtol=0, err_msg=k)
  moved = max(float(np.abs(ours_w[k] - ours_w0[k]).max()) for k in theirs)
  assert moved > 0.5 * _LR  # the step moved the weights far beyond the tolerance


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

  def trainer(self, pipe, tokenizer, placed, images, cfg, seed):
    r = len([c for c in self.calls if c[0] == "ste"]) - 1
    if r == self.fail_at_round:
      raise KeyboardInterrupt(f"interrupted in round {r}")
    d = pipe.text_params["embeddings"]["token_embedding"]["embedding"].shape[-1]
    return jnp.zeros((1, d)), lambda e, a, b: (e + (r + 1.0) * (a == 0), jnp.float32(0.1))  # once a round


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
  assert stereo_runs.steady_seconds(str(tmp_path), _config()) > 0  # every stage timed
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
  with open(tmp_path / "stereo" / stereo_runs.TIMING) as f:  # each stage timed once, the resumed ones included
    stages = [json.loads(line)["stage"] for line in f]
  assert stages == ["ste_erase_0", "ste_inversion_0", "ste_erase_1", "ste_inversion_1", "reo"]
  np.testing.assert_array_equal(_leaf(fakes.calls[0][1]), _leaf(original) + 1.0)  # round 1 from round 0's UNet

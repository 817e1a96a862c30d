"""AdvUnlearn on the micro SDXL layout: the attack on both towers, each tower method, both x_t sources, and the
conditioning the step builds against the pipeline's (sdxl_conditioning)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from advunlearn_jax import config_lib, sharding
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import generation, sdxl_conditioning
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.testing import tiny_models
from advunlearn_jax.training import checkpoint, config_validation, hub, run_exports, runs, train
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import prompts, retain, trainable, wiring
from advunlearn_jax.unlearn import step as step_lib

STEP = wiring.train_step
K = 2  # adversarial tokens
ONE_DEVICE = jax.devices()[:1]  # as tests/test_train.py: the run, not its layout


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return tiny_models.write_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl") / "micro_sdxl"), seed=3)


@pytest.fixture(scope="module")
def pipe(folder):
  """As a user samples it: with its VAE, whose scale sets the micro-conditioning's image size (the run's time ids
  equal these whether or not it loads the VAE's weights)."""
  return sd_convert.load_sdxl_pipeline(folder)


def run_config(folder="", method="text_encoders_full", xt_source="online"):
  c = config_lib.base_config()
  c.model.pretrained = folder
  c.concept.prompts = ("nudity",)
  c.retain.dataset, c.retain.prompts = "", tuple(retain.load_dataset("coco_object")[:4])
  c.retain.batch = 2
  c.retain.weight = 0.5
  c.train.lr = 1e-3
  c.train.method = method
  c.train.xt_source = xt_source
  c.train.warmup_iters = 0
  c.train.iterations = 2
  c.train.save_every = 1
  c.train.log_every = 1
  c.attack.steps = 2
  c.attack.num_tokens = K
  c.diffusion.ddim_steps = 4
  c.samples.every = 0
  return c


def wire(pipe, config):
  return wiring.wire_sdxl(
    config,
    wiring.TrainingSections.from_config(config),
    pipe,
    tokenizer=tok_lib.load_tokenizer(pipe.tokenizer_dir),
    tokenizer_2=tok_lib.load_tokenizer(pipe.tokenizer_2_dir),
    retain_prompts=config.retain.prompts,
  )


@pytest.fixture(scope="module")
def both(folder, tmp_path_factory):
  """The first iteration of `main`'s run on the micro SDXL folder (attacked, both towers, online x_t), set up and
  stepped as train.run does: the compiled step several tests read, and the one the end-to-end run reuses."""
  config = run_config(folder)
  setup = train.set_up(config, config_validation.validate(config), ONE_DEVICE)
  workdir = str(tmp_path_factory.mktemp("sdxl_first_step"))
  progress = train.restore_or_start(config, setup, checkpoint.manager(workdir, 1), workdir)
  root_key = sharding.replicate(jax.random.key(config.seed), setup.mesh)
  batch, _ = train.iteration_batch(config, setup.wired.cfg, 0, root_key, progress.sampler, len(setup.retain_prompts))
  wired = setup.wired
  out, metrics = STEP(
    wired.cfg, wired.models, progress.state, wired.frozen, sharding.replicate(batch, setup.mesh), True, new_prompt=True
  )
  return wired, out, jax.device_get(metrics)


def _student(wired, params):
  return step_lib.student_params(wired.cfg, wired.models, wired.frozen, params)[0]


def _changed(a, b):
  return [np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


def test_the_step_conditions_the_concept_as_the_pipeline_does(pipe, both):
  """The frozen embeddings (the ESD target's e_0, e_p, the rollouts') and the step's own encoding of the plain
  concept equal sdxl_conditioning.encode_prompts / unconditional: the target is the pipeline's."""
  wired = both[0]
  frozen, models = wired.frozen, wired.models
  ref = sdxl_conditioning.encode_prompts(pipe, ["nudity"])
  ids = frozen.concept_ids[:1]
  ours = step_lib._encode(models)(frozen.clip, step_lib._words(models, frozen, ids), step_lib._plain_eot(ids))
  for got in (ours, jax.tree.map(lambda a: a[:1], frozen.concept_emb)):
    # float32 on both sides; ids vs embedding rows (and tower 2's "!" rows put in by the step) differ in no value
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, ref)
  uncond = sdxl_conditioning.unconditional(pipe, 1)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[None], b), frozen.emb_uncond, uncond)
  assert float(jnp.abs(uncond.context).max()) == 0.0  # force_zeros_for_empty_prompt


def test_one_attacked_iteration_on_both_towers(both):
  wired, state, metrics = both
  for name in ("loss", "loss_unlearn", "loss_retain", "attack_loss_first", "attack_loss_last"):
    assert np.isfinite(metrics[name]), name
  # Measured before the update, at the original towers: the step's own encoding of the retain prompts is the
  # pipeline's (the frozen target's), so the retain term starts at zero.
  assert metrics["loss_retain"] < 1e-10
  frozen, models = wired.frozen, wired.models
  seq, delta = state.last_sequence, state.last_delta
  d1, d2 = (t.shape[-1] for t in step_lib._token_table(models, frozen))
  assert [a.shape for a in seq] == [(77, d1), (77, d2)] and [a.shape for a in delta] == [(K, d1), (K, d2)]
  # prefix_k: the k rows at positions 1..k in both towers, the clean words everywhere else.
  word_index, delta_index = frozen.word_index[0], frozen.delta_index[0]
  np.testing.assert_array_equal(np.flatnonzero(delta_index >= 0), np.arange(1, 1 + K))
  clean = step_lib._words(models, frozen, frozen.concept_ids[0])
  for s, d, w in zip(seq, delta, clean):
    np.testing.assert_array_equal(s[1 : 1 + K], d)
    np.testing.assert_array_equal(s, prompts.build_sequence(w, d, word_index, delta_index))
    assert not any(np.allclose(s[p], w[q]) for p in range(1, 1 + K) for q in range(w.shape[0]))
  # The typed prompt's EOT moved k places on: tower 2's pooled position.
  eot = step_lib._layout_eot(frozen.concept_ids[0], word_index, delta_index)
  assert int(eot) == int(step_lib._plain_eot(frozen.concept_ids[0])) + K


def test_the_attack_moves_both_towers_inputs(both):
  """Each tower's adversarial rows change the attack's loss: the gradient reaches both deltas."""
  wired, state, _ = both
  frozen, models = wired.frozen, wired.models
  text = _student(wired, state.params)
  ids = frozen.concept_ids[0]
  eot = step_lib._layout_eot(ids, frozen.word_index[0], frozen.delta_index[0])[None]
  encode = lambda seq: step_lib._encode(models)(text, jax.tree.map(lambda a: a[None], seq), eot)  # noqa: E731
  base = encode(state.last_sequence)
  for tower in range(2):
    moved = list(state.last_sequence)
    moved[tower] = moved[tower].at[1].add(1.0)
    cond = encode(tuple(moved))
    assert float(jnp.abs(cond.context - base.context).max()) > 1e-4, tower
  # tower 2 alone shapes the pooled embedding
  moved = (state.last_sequence[0].at[1].add(1.0), state.last_sequence[1])
  np.testing.assert_array_equal(encode(moved).added.text_embeds, base.added.text_embeds)


@pytest.mark.parametrize(
  "method,towers",
  [("text_encoders_full", ("text_encoder", "text_encoder_2")), ("text_encoder_2_full", ("text_encoder_2",))],
)
def test_only_the_chosen_towers_change(pipe, both, method, towers):
  """Both towers (the attacked online iteration), or tower 2 alone in a warm-up iteration whose x_t come from the
  trajectory bank (a second compile, of the cheaper step)."""
  if method == "text_encoders_full":
    wired, state, metrics = both
  else:
    wired = wire(pipe, run_config(method=method, xt_source="bank"))
    fixed = dict(refresh_trajectories=0, refresh_retain=0)
    cfg = dataclasses.replace(wired.cfg, bank=dataclasses.replace(wired.cfg.bank, concept_trajectories=2, **fixed))
    hw, ch = cfg.latent_hw, cfg.latent_channels
    bank = bank_lib.build(
      wired.models.unet,
      wired.frozen.unet,
      wired.frozen,
      jax.random.key(1),
      cfg.bank,
      latent_shape=(hw, hw, ch),
      guidance=cfg.start_guidance,
    )
    assert np.all(np.isfinite(bank.concept)) and bank.concept.shape[:2] == (1, 2)
    state0 = step_lib.init_state(cfg, wired.models, wired.frozen, bank)
    batch = step_lib.Batch(jnp.arange(2, dtype=jnp.int32), jax.random.key(1))
    state, metrics = STEP(cfg, wired.models, state0, wired.frozen, batch, False)
  assert np.isfinite(float(metrics["loss"]))
  assert {k.split("/")[0] for k in state.params} == set(towers)
  text = _student(wired, state.params)
  for tower in ("text_encoder", "text_encoder_2"):
    changed = _changed(text[tower], wired.frozen.clip[tower])
    assert any(changed) == (tower in towers), tower
  if "text_encoder" in towers:  # its last layer feeds nothing SDXL reads (penultimate states): no gradient
    last = f"layers_{wired.models.clip.config.num_hidden_layers - 1}"
    assert not any(_changed(text["text_encoder"]["encoder"][last], wired.frozen.clip["text_encoder"]["encoder"][last]))


@pytest.mark.parametrize("method", ["text_encoder_full", "text_encoder_layer0"])
def test_tower_1_methods_select_tower_1_alone(pipe, method):
  train = config_lib.base_config().train
  train.method = method
  params = {"text_encoder": pipe.text_params, "text_encoder_2": pipe.text_params_2}
  chosen = trainable.selected_paths(trainable.Trained.from_config(train).mask(params))
  assert chosen and {p[0] for p in chosen} == {"text_encoder"}
  if method == "text_encoder_layer0":
    assert {p[2] for p in chosen} == {"layers_0"}


def test_tower_2_method_trains_the_projection(pipe):
  train = config_lib.base_config().train
  train.method = "text_encoder_2_full"
  params = {"text_encoder": pipe.text_params, "text_encoder_2": pipe.text_params_2}
  chosen = trainable.selected_paths(trainable.Trained.from_config(train).mask(params))
  assert ("text_encoder_2", "text_projection", "kernel") in chosen
  assert not any(p[:4] == ("text_encoder_2", "text_model", "embeddings") for p in chosen)  # never the tables


def test_sdxl_methods_are_refused_on_sd():
  clip, _ = tiny_models.params()
  train = config_lib.base_config().train
  train.method = "text_encoder_2_full"
  with pytest.raises(ConfigError, match="SDXL method"):
    trainable.Trained.from_config(train).mask(clip)


def test_the_trained_pair_exports_as_a_drop_in(pipe, both, tmp_path):
  """Both towers as transformers folders and the whole SDXL folder with the pair in place: ours reads back the
  trained weights bit for bit, and diffusers' StableDiffusionXLPipeline loads the folder."""
  diffusers = pytest.importorskip("diffusers")
  wired, state, _ = both
  text = jax.device_get(_student(wired, state.params))
  out = run_exports.write(str(tmp_path / "export"), pipe, "text_encoder", text)
  back = sd_convert.load_sdxl_pipeline(out["pipeline"], with_vae=False)
  for tower, params in (("text_encoder", back.text_params), ("text_encoder_2", back.text_params_2)):
    jax.tree.map(np.testing.assert_array_equal, params, text[tower])
    _, alone = clip_convert.load_clip_text(out[tower])
    jax.tree.map(np.testing.assert_array_equal, alone, text[tower])
  jax.tree.map(np.testing.assert_array_equal, back.unet_params, pipe.unet_params)
  loaded = diffusers.StableDiffusionXLPipeline.from_pretrained(out["pipeline"], add_watermarker=False)
  assert type(loaded.text_encoder_2).__name__ == "CLIPTextModelWithProjection"


def test_tiny_sdxl_config_trains_both_towers_of_the_shipped_model():
  """configs/tiny_sdxl.py is configs/tiny.py on the shipped SDXL-layout model, both towers trained."""
  from advunlearn_jax.configs import tiny, tiny_sdxl
  from advunlearn_jax.training import config_validation

  config, sd = tiny_sdxl.get_config("striped"), tiny.get_config("striped")
  sections = config_validation.validate(config)
  assert sections.trained.towers() == ("text_encoder", "text_encoder_2")
  assert sd_convert.is_sdxl_folder(sd_convert.resolve_pretrained(config.model.pretrained))
  config.model.pretrained, config.train.method = sd.model.pretrained, sd.train.method
  assert config.to_dict() == sd.to_dict()  # nothing else differs


def test_sdxl_nudity_config_builds():
  """configs/sdxl_nudity.py validates (no SDXL weights here: built, not trained)."""
  from advunlearn_jax.configs import sdxl_nudity
  from advunlearn_jax.training import config_validation

  config = sdxl_nudity.get_config()
  sections = config_validation.validate(config)
  assert sections.trained.towers() == ("text_encoder", "text_encoder_2")
  assert (config.attack.steps, config.attack.num_tokens, config.attack.type) == (30, 1, "prefix_k")
  assert (config.retain.weight, config.retain.dataset, config.train.lr) == (0.3, "coco_object", 1e-5)


def test_main_trains_exports_and_resumes_on_an_sdxl_folder(folder, both, tmp_path):
  """`main`'s run (runs.run) on the SDXL folder: two iterations with a preview grid, both towers exported into the
  workdir and its pipeline/, a resumed third iteration, and the `export` command's read of the latest checkpoint
  equal to the run's own export. Its attacked step is the `both` fixture's, compiled once."""
  config = run_config(folder)
  config.samples.every, config.samples.steps, config.samples.retain_prompts = 2, 1, 1
  config.report.kind, config.report.erased, config.report.images_per_value = "tiny_world", ("triangle",), 1
  workdir = str(tmp_path / "run")
  compiled = STEP._cache_size()
  result = runs.run(config, workdir, devices=ONE_DEVICE, show_progress=False)
  assert STEP._cache_size() == compiled  # the fixture's step: set_up builds what it built
  assert set(result) >= {"text_encoder", "text_encoder_2", "pipeline"}
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_000002.png")))
  size = generation.image_size(sd_convert.load_sdxl_pipeline(folder))
  assert grid.shape == (2 * size, 2 * size, 3)  # original over current, concept + one retain prompt
  assert np.any(grid[:size] != grid[size:])  # the current towers drew the bottom row
  report = json.loads(open(os.path.join(workdir, "report", "report.json")).read())  # the tiny report reads SDXL
  assert [r["value"] for r in report["shape"] if r["erased"]] == ["triangle"] and report["images_per_value"] == 1
  exported = sd_convert.load_sdxl_pipeline(result["pipeline"], with_vae=False)
  config.train.iterations = 3
  resumed = runs.run(config, workdir, devices=ONE_DEVICE, show_progress=False)
  assert resumed["resumed_from"] == 2
  out = run_exports.export_latest(workdir, str(tmp_path / "export"))
  latest = sd_convert.load_sdxl_pipeline(out["pipeline"], with_vae=False)
  again = sd_convert.load_sdxl_pipeline(resumed["pipeline"], with_vae=False)
  for tower in ("text_params", "text_params_2"):
    jax.tree.map(np.testing.assert_array_equal, getattr(latest, tower), getattr(again, tower))
    assert any(_changed(getattr(again, tower), getattr(exported, tower))), tower  # the third iteration trained it
  with pytest.raises(ConfigError, match="TextEncoder"):
    run_exports.export_latest(workdir, str(tmp_path / "ref"), fmt="reference")
  with pytest.raises(ConfigError, match="--hub_dir: the run trained SDXL"):
    hub.write_folder(str(tmp_path / "hub"), workdir)


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("export.reference_checkpoint", True, "one text encoder"),
    ("stereo.enabled", True, "STEREO"),
    ("attack.embedding", "condition_embd", "word_embd"),
  ],
)
def test_sd_only_settings_are_refused_before_any_work(folder, tmp_path, monkeypatch, key, value, match):
  """Refused from the UNet's config alone, by `main`'s own entry (runs.run, which STEREO's branch leaves before
  set_up), before a weight is read."""
  config = run_config(folder)
  section, field = key.split(".")
  setattr(getattr(config, section), field, value)

  def no_weights(*args, **kwargs):
    raise AssertionError("weights read before the refusal")

  for loader in ("load_either", "load_pipeline", "load_sdxl_pipeline"):
    monkeypatch.setattr(sd_convert, loader, no_weights)
  with pytest.raises(ConfigError, match=match):
    runs.run(config, str(tmp_path / "run"), devices=ONE_DEVICE, show_progress=False)

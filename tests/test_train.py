"""End-to-end training on a tiny random pipeline: outputs, metrics, checkpoints, resume, config guards."""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.testing import tiny_models
from advunlearn_jax.training import runs, train
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import retain, wiring
from advunlearn_jax.unlearn import step as step_lib

# One device, as on a user's laptop: these tests are about the run, not its layout (test_scale.py, test_multihost.py
# and test_population.py are). On 2 cores, 8 simulated devices each compute the replicated tiny batch: 2-4x slower.
ONE_DEVICE = jax.devices()[:1]


def run(config, workdir, **kwargs):
  """runs.run on ONE_DEVICE."""
  return runs.run(config, workdir, devices=ONE_DEVICE, **kwargs)


def tiny_config(pipeline_dir, *overrides: str):
  """The tiny run on `pipeline_dir`, with `overrides` ("section.field=value", as the command line's --config.)."""
  c = config_lib.base_config()
  c.model.pretrained = pipeline_dir
  c.concept.prompts = ("nudity", "church")
  c.train.iterations = 4
  c.train.warmup_iters = 2
  c.train.save_every = 2
  c.train.log_every = 1
  c.train.lr = 1e-3
  c.retain.batch = 2
  c.retain.weight = 0.5
  c.attack.steps = 2
  c.attack.lr = 1e-2
  c.samples.every = 0
  return config_lib.override(c, overrides)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  return tiny_models.write_pipeline(str(tmp_path_factory.mktemp("tiny") / "pipe"))


def test_run_trains_exports_and_resumes(pipeline_dir, tmp_path):
  # A new concept and adversarial prompt every 2 iterations (the reference's --adv_prompt_update_step), and
  # numbered exports every 2, with the reference's .pt beside each.
  updates = ("attack.update_every=2", "export.every=2", "export.reference_checkpoint=true")
  workdir = str(tmp_path / "run")
  compiled_before = wiring.train_step._cache_size()
  summary = run(tiny_config(pipeline_dir, "samples.every=2", "samples.steps=3", *updates), workdir)
  compiled = wiring.train_step._cache_size()
  assert compiled - compiled_before <= 3  # warm-up, attacking, reusing steps: never one per iteration
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m["step"] for m in lines] == [1, 2, 3, 4]
  # Iteration 2 (the first after warm-up) searches a prompt, 3 reuses it, with its concept; 1 keeps 0's concept.
  assert ["attack_loss_last" in m for m in lines] == [False, False, True, False]
  assert lines[0]["concept"] == lines[1]["concept"] and lines[2]["concept"] == lines[3]["concept"]
  # Previews: original (top row) vs current (bottom row) for the 2 concepts and 3 retain prompts.
  from PIL import Image

  assert sorted(os.listdir(os.path.join(workdir, "samples"))) == ["step_000002.png", "step_000004.png"]
  grid = np.asarray(Image.open(os.path.join(workdir, "samples", "step_000004.png")))
  assert grid.shape == (2 * 16, 5 * 16, 3)
  assert np.any(grid[:16] != grid[16:])  # the encoder moved
  (events,) = os.listdir(os.path.join(workdir, "tensorboard"))
  from tensorboardX.proto import event_pb2

  tags = set()
  with open(os.path.join(workdir, "tensorboard", events), "rb") as f:
    data = f.read()
  offset = 0
  while offset < len(data):  # TFRecord framing: length, crc, payload, crc
    n = int.from_bytes(data[offset : offset + 8], "little")
    event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + n])
    tags.update(v.tag for v in event.summary.value)
    offset += 12 + n + 4
  assert {"loss", "attack_loss_last", "samples/original_vs_current"} <= tags
  assert "attack_loss_last" not in lines[1] and "attack_loss_last" in lines[2]  # warm-up: no attack
  assert all(np.isfinite(m["loss"]) for m in lines)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]

  config, trained = clip_convert.load_clip_text(summary["text_encoder"])
  _, original = clip_convert.load_clip_text(os.path.join(pipeline_dir, "text_encoder"))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), trained, original)
  assert changed["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"] and changed["final_layer_norm"]["scale"]
  assert not changed["embeddings"]["token_embedding"]["embedding"]  # embeddings are never trained
  assert os.path.isfile(os.path.join(summary["pipeline"], "unet", "diffusion_pytorch_model.safetensors"))
  assert summary["reference_checkpoint"] == os.path.join(workdir, "TextEncoder-text_encoder_full-epoch_3.pt")
  jax.tree.map(
    np.testing.assert_array_equal,
    clip_convert.load_reference_checkpoint(summary["reference_checkpoint"], config),
    trained,
  )
  # Numbered exports beside the rolling checkpoints, every 2 iterations, the last one included.
  assert sorted(os.listdir(os.path.join(workdir, "exports"))) == ["step_000002", "step_000004"]
  numbered = os.path.join(workdir, "exports", "step_000002")
  assert sorted(os.listdir(numbered)) == ["TextEncoder-text_encoder_full-epoch_1.pt", "text_encoder"]
  assert Image.open(os.path.join(workdir, "loss.png")).size == (700, 400)

  # On-demand export from the latest checkpoint gives the same encoder.
  from advunlearn_jax.training import run_exports

  exported = run_exports.export_latest(workdir, str(tmp_path / "exported"))
  _, again = clip_convert.load_clip_text(exported["text_encoder"])
  jax.tree.map(np.testing.assert_array_equal, again, trained)
  # An export replaces an earlier export (it carries the marker), and a Hub export into a clone of a Hub
  # repository keeps the clone's git data (test_bad_inputs.py: what it refuses to write over).
  run_exports.export_latest(workdir, str(tmp_path / "exported"))
  clone = tmp_path / "clone"
  (clone / ".git").mkdir(parents=True)
  (clone / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
  (clone / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
  from advunlearn_jax.training import hub

  for _ in range(2):  # into the fresh clone, then over its own earlier export
    hub.write_folder(str(clone), workdir, license_id="mit")
  assert sorted(os.listdir(clone)) == [
    run_exports.MARKER, ".git", ".gitattributes", "README.md", "text_encoder", "training_config.json"
  ]  # fmt: skip
  assert (clone / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n"
  as_reference = run_exports.export_latest(workdir, str(tmp_path / "reference"), fmt="reference")
  assert as_reference["reference_checkpoint"].endswith("reference/TextEncoder-text_encoder_full-epoch_3.pt")
  again = clip_convert.load_reference_checkpoint(as_reference["reference_checkpoint"], config)
  jax.tree.map(np.testing.assert_array_equal, again, trained)

  # Resuming with more iterations continues from step 4, and equals an uninterrupted 6-step run.
  run(tiny_config(pipeline_dir, "train.iterations=6", *updates), workdir)
  straight = str(tmp_path / "straight")
  run(tiny_config(pipeline_dir, "train.iterations=6", *updates), straight)
  assert wiring.train_step._cache_size() == compiled  # two more runs, more iterations: nothing recompiled
  _, resumed = clip_convert.load_clip_text(os.path.join(workdir, "text_encoder"))
  _, uninterrupted = clip_convert.load_clip_text(os.path.join(straight, "text_encoder"))
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)
  # Step 4's numbered export is the first run's final encoder; the resumed run added step 6's, its own final one.
  assert sorted(os.listdir(os.path.join(workdir, "exports"))) == ["step_000002", "step_000004", "step_000006"]
  _, at_4 = clip_convert.load_clip_text(os.path.join(workdir, "exports", "step_000004", "text_encoder"))
  jax.tree.map(np.testing.assert_array_equal, at_4, trained)
  _, at_6 = clip_convert.load_clip_text(os.path.join(workdir, "exports", "step_000006", "text_encoder"))
  jax.tree.map(np.testing.assert_array_equal, at_6, resumed)


def test_prompt_updates_and_retain_draws_follow_the_reference_schedule():
  # update_every 3, warm-up 5: the first attacking iteration searches its own prompt, then every multiple of 3.
  assert [train.prompt_update(i, 5, 3) for i in range(11)] == [0, 0, 0, 3, 3, 5, 6, 6, 6, 9, 9]
  config, root = config_lib.base_config(), jax.random.key(0)
  base = wiring.step_config(config, wiring.TrainingSections.from_config(config), 1, tiny_models.UNET)
  cfg = dataclasses.replace(base, retain=base.retain._replace(mode="iter", steps=3, batch=2))
  start = retain.SamplerState(0, 0)
  batch, sampler = train.iteration_batch(config, cfg, 7, root, start, n_prompts=10)
  assert batch.retain_idx.shape == (0,) and sampler == retain.SamplerState(0, 6)  # 3 draws of 2 prompts
  assert len({tuple(row) for row in batch.iter_retain_idx.tolist()}) == 3  # a fresh batch per extra step
  cfg = dataclasses.replace(cfg, retain=cfg.retain._replace(fresh_per_step=False))
  batch, sampler = train.iteration_batch(config, cfg, 7, root, start, n_prompts=10)
  assert len({tuple(row) for row in batch.iter_retain_idx.tolist()}) == 1 and sampler == retain.SamplerState(0, 2)
  reg = dataclasses.replace(base, retain=base.retain._replace(batch=2))
  batch, _ = train.iteration_batch(config, reg, 7, root, start, n_prompts=10)
  assert batch.retain_idx.shape == (2,) and batch.iter_retain_idx is None  # reg mode: the defender's batch
  assert batch.restart is None  # attack.restart_every = 0: the attack never restarts
  # A persistent attack restarting every 2nd round; rounds at 5 (the first), 6 and 9; iterations between reuse theirs.
  config.train.warmup_iters, config.attack.update_every, config.attack.restart_every = 5, 3, 2
  assert [train.attack_round(i, 5, 3) for i in range(5, 13)] == [0, 1, 1, 1, 2, 2, 2, 3]
  restarts = [bool(train.iteration_batch(config, reg, i, root, start, 10)[0].restart) for i in range(5, 13)]
  assert restarts == [True, False, False, False, True, True, True, False]


def test_issue_49s_threat_models_lay_out_their_tokens_and_resume_bit_identical(pipeline_dir, tmp_path):
  """Issue 49's threat models at once: the adversarial rows stand where the concept's words stood in each concept
  prompt (attack.type=word_k), carry over from round to round with a restart every 2nd (attack.restart_every),
  minimise both the reference's loss and CCE's on images of the concept (attack.objective=both), and each round
  draws that threat model or the reference's prefix (attack.mix). A run stopped after 3 iterations and resumed to 5
  equals one that ran straight, bit for bit: the carried rows go through the checkpoint, the draws follow the
  round."""
  from PIL import Image

  images = tmp_path / "concept_images"  # the random pipeline draws 16 px; any size is resized to it
  images.mkdir()
  for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)):
    Image.fromarray(pixels).save(images / f"{i}.png")
  overrides = [
    "concept.prompts=('a photo of nudity', 'a church at night')",
    "attack.words=('nudity', 'church')",
    "attack.type=word_k",
    "attack.init=latest",
    "attack.latest_init_quirk=false",
    "attack.restart_every=2",
    "train.warmup_iters=0",
    "train.save_every=1",
    "attack.objective=both",
    f"attack.images={images}",
    "attack.mix=('type=prefix_k objective=esd', '')",
  ]
  config = tiny_config(pipeline_dir, *overrides)
  clip, unet = tiny_models.params()
  wired = wiring.wire(
    config, wiring.TrainingSections.from_config(config), clip_config=tiny_models.CLIP, clip_params=clip,
    unet_config=tiny_models.UNET, unet_params=unet, schedule=tiny_models.SCHEDULE,
    tokenizer=tok_lib.load_tokenizer(), retain_prompts=("a photo of a dog",),
  )  # fmt: skip
  # 'a photo of nu dity' -> [SOT, a, photo, of, d1, EOT...]; 'a church at night' -> [SOT, a, d1, at, night, EOT...]:
  # each row of word_index is the clean prompt's position it copies.
  word_index, delta_index = np.asarray(wired.frozen.word_index)[:, :7], np.asarray(wired.frozen.delta_index)[:, :7]
  assert word_index.tolist() == [[0, 1, 2, 3, -1, 6, 7], [0, 1, -1, 3, 4, 5, 6]]
  assert delta_index.tolist() == [[-1, -1, -1, -1, 0, -1, -1], [-1, -1, 0, -1, -1, -1, -1]]

  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  run(tiny_config(pipeline_dir, *overrides, "train.iterations=5"), straight)
  run(tiny_config(pipeline_dir, *overrides, "train.iterations=3"), resumed)
  assert run(tiny_config(pipeline_dir, *overrides, "train.iterations=5"), resumed)["resumed_from"] == 3
  logs = [[json.loads(line) for line in open(f"{w}/metrics.jsonl")] for w in (straight, resumed)]
  assert [m["attack_loss_first"] for m in logs[0]] == [m["attack_loss_first"] for m in logs[1]] and len(logs[0]) == 5
  # Seed 0's draws: the word-place member ('') for rounds 0-3, so the resumed run's round 3 carries round 2's rows
  # through the checkpoint; the prefix in round 4.
  assert [m["threat"] for m in logs[0]] == [m["threat"] for m in logs[1]] == [1, 1, 1, 1, 0]
  a, b = (clip_convert.load_clip_text(os.path.join(w, "text_encoder"))[1] for w in (straight, resumed))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_workdir_from_another_config_is_refused(pipeline_dir, tmp_path):
  workdir = str(tmp_path / "run")
  run(tiny_config(pipeline_dir, "train.iterations=2", "train.warmup_iters=2"), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ConfigError, match=r"different config \(retain.weight: 0.5 -> 0.3\)"):
    run(tiny_config(pipeline_dir, "retain.weight=0.3", "train.warmup_iters=2"), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.parametrize(
  "overrides,message",
  [
    (["train.method=text_encoder_half"], "config.train.method is 'text_encoder_half'; valid"),
    (["attack.type=prepend"], r"config.attack.type is 'prepend'; valid: \['prefix_k'"),
    (["attack.method=free_at"], "config.attack.method is 'free_at'"),
    (["train.xt_source=batched"], r"config.train.xt_source is 'batched'; valid: \['online', 'online_sequential'"),
    (["train.rollout_buckets=-2"], "rollout_buckets must be >= 0 .* got -2"),
    (["bank.refresh_every=0"], "config.bank.refresh_every must be >= 1"),
    (["attack.update_every=0"], "config.attack.update_every must be >= 1, got 0"),
    (["retain.dataset=coco"], r"config.retain.dataset: coco not found \(expected one of \['coco_object'"),
    (["retain.prompts=('a photo of a dog',)"], "config.retain.prompts lists 1 prompts and config.retain.dataset"),
    (["export.every=-1"], "config.export.every must be >= 0"),
    (["train.method=xattn", "export.reference_checkpoint=true"], "trains the UNet; the reference's"),
    (["evaluation.latents=numpy"], r"config.evaluation.latents is 'numpy'; expected one of \['jax', 'torch'\]"),
    (["report.kind=tiny"], r"config.report.kind is 'tiny'; valid: \['', 'tiny_world'\]"),
    (
      ["attack.type=word_k", "attack.words=('nudity',)"],
      r"config.concept.prompts: 'church' holds none of config.attack.words \['nudity'\], where attack.type=word_k",
    ),
    (["attack.restart_every=2"], "restart_every=2 restarts a persistent attack; it needs config.attack.init='latest'"),
    (["attack.restart_every=-1"], "config.attack.restart_every must be >= 0, got -1"),
    (["attack.objective=cce"], r"config.attack.objective is 'cce'; valid: \['esd', 'inversion', 'both'\]"),
    (["attack.objective=inversion"], "objective='inversion' attacks with images of the concept; name them in"),
    (["attack.objective=both", "attack.images=/no/such"], "config.attack.images: image folder '/no/such' does not"),
    (["attack.mix=('', 'num_tokens=3')"], r"config.attack.mix\[1\] = 'num_tokens=3': 'num_tokens' cannot differ"),
    (["attack.mix=('type=add',)"], "type=add sets k to the concept's length"),
    (["attack.mix=('type=prepend',)"], r"config.attack.type is 'prepend'; valid: \['prefix_k'"),
    (["attack.mix=('objective=inversion',)"], "objective='inversion' attacks with images of the concept"),
    (["attack.mix=('steps=zero',)"], r"config.attack.mix\[0\]: attack.steps"),
    (["attack.mix=('lr=-1',)"], r"config.attack.mix\[0\] = 'lr=-1': config.attack.lr must be > 0, got -1"),
    (["attack.type=add", "attack.mix=('type=prefix_k',)"], "type=add sets k to the concept's length"),
    (["attack.mix=('objective = inversion',)"], r"'objective' is no field=value \(no spaces around '='\)"),
    (
      ["attack.mix=('', 'type=word_k')", "attack.words=('nudity', 'church')", "attack.init=latest"],
      r"latest_init_quirk=True starts each round from positions 1..k of the last sequence, which attack types",
    ),
    (
      ["retain.dataset=", "retain.prompts=('a photo of a dog',)", "retain.batch=1", "bank.refresh_retain=2"],
      "refresh_retain \\(2\\) exceeds",
    ),
    (["first_stage=('train.lr=0',)"], "config.first_stage: config.train.lr must be > 0, got 0"),
    (["first_stage=('train.lrr=1',)"], "config.first_stage: train.lrr: the config has no field 'lrr'"),
    (["first_stage=('train.lr 1',)"], r"config.first_stage\[0\] = 'train.lr 1' is no section.field=value"),
    (["first_stage=('model.pretrained=tiny',)"], "model.pretrained belongs to the whole recipe, not a stage"),
    (["first_stage=('report.kind=tiny_world',)"], "report.kind belongs to the whole recipe"),
    (["first_stage=('train.method=xattn',)", "stereo.enabled=true"], "STEREO runs its own stages"),
    (["first_stage=('train.method=xattn',)", "export.reference_checkpoint=true"], "the reference's TextEncoder"),
  ],
)
def test_bad_config_values(pipeline_dir, tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=message):
    run(tiny_config(pipeline_dir, *overrides), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_issue_49s_image_sources_are_checked_before_any_weights_load(pipeline_dir):
  """The inversion objective's images are read after the pipeline loads (train.concept_latents); what a source can
  fail without reading it, validation says first."""
  from advunlearn_jax.training import config_validation

  for source, message in (
    ("/no/such", "config.attack.images: image folder '/no/such' does not exist"),
    ("tiny_world:hexagon", "config.attack.images='tiny_world:hexagon': 'hexagon' is not a tiny-world value"),
    ("tfds:coco", "config.attack.images is 'tfds:coco': expected tfds:NAME"),
  ):
    with pytest.raises(ConfigError, match=message):
      config_validation.validate(tiny_config(pipeline_dir, "attack.mix=('objective=both',)", f"attack.images={source}"))


def test_bad_retain_csv_and_concepts(pipeline_dir, tmp_path):
  csv = tmp_path / "retain.csv"
  csv.write_text("case_num,source,text\n0,coco,a photo of a dog\n")
  with pytest.raises(ConfigError, match=r"retain.dataset: .*retain.csv has no 'prompt' column"):
    run(tiny_config(pipeline_dir, f"retain.dataset={csv}"), str(tmp_path / "w"))
  with pytest.raises(ConfigError, match="at most 75 fit"):
    run(tiny_config(pipeline_dir, f"concept.prompts={('word ' * 80,)!r}"), str(tmp_path / "w"))


@pytest.mark.slow
def test_a_unet_run_trains_only_its_layers_and_a_second_stage_trains_over_it(pipeline_dir, tmp_path, monkeypatch):
  """The first stage: an ESD-x style baseline, the UNet's cross-attention trained online, the text encoder
  untouched, exported as a UNet run is. Then config.first_stage's second stage, the text encoder over that
  exported pipeline; the recipe's report compares the final pipeline with model.pretrained. A rerun trains
  nothing, a moved workdir resumes and exports over its own first stage, and a changed first stage is refused
  before it trains."""
  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.evals import report_kinds
  from advunlearn_jax.training import checkpoint, hub, run_exports

  reports = []
  monkeypatch.setattr(
    report_kinds.TinyWorld, "after_run", lambda c, w, p: reports.append((c.model.pretrained, w, p)) or None
  )
  first = "('train.method=xattn', 'train.iterations=3', 'train.warmup_iters=3')"  # ESD-x: no attack, one step
  config = tiny_config(pipeline_dir, f"first_stage={first}", "report.kind=tiny_world", "export.every=2")
  workdir = str(tmp_path / "robust")
  summary = run(config, workdir)
  stage = os.path.join(workdir, "first_stage")
  # The first stage's own iterations, and no numbered exports: only the recipe's result is exported along the way.
  assert sorted(os.listdir(os.path.join(stage, "checkpoints"))) == ["2", "3"] and not os.path.exists(
    os.path.join(stage, "exports")
  )
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  # Its UNet is the first stage's, bit for bit; its text encoder is the second stage's, trained from the original.
  _, erased = sd_convert.load_unet(os.path.join(stage, "unet"))
  _, final_unet = sd_convert.load_unet(os.path.join(summary["pipeline"], "unet"))
  _, original_unet = sd_convert.load_unet(os.path.join(pipeline_dir, "unet"))
  jax.tree.map(np.testing.assert_array_equal, final_unet, erased)
  flat_t, flat_o = (dict(jax.tree_util.tree_leaves_with_path(p)) for p in (erased, original_unet))
  changed = {jax.tree_util.keystr(k) for k in flat_t if np.any(flat_t[k] != flat_o[k])}
  assert changed and all("attn2" in name for name in changed)  # the first stage trained only its layers
  # `export` of the UNet run writes what the run's own export wrote; the reference's .pt holds text encoders only.
  exported = run_exports.export_latest(stage, str(tmp_path / "first_exported"))
  _, again = sd_convert.load_unet(exported["unet"])
  jax.tree.map(np.testing.assert_array_equal, again, erased)
  assert os.path.isfile(os.path.join(exported["pipeline"], "unet", "config.json"))
  with pytest.raises(ConfigError, match="trains the UNet; the reference's"):
    run_exports.export_latest(stage, str(tmp_path / "first_ref"), fmt="reference")
  with pytest.raises(ConfigError, match="cannot be precomputed"):
    run(tiny_config(pipeline_dir, "train.method=xattn", "train.xt_source=bank"), str(tmp_path / "b"))
  _, encoder = clip_convert.load_clip_text(summary["text_encoder"])
  _, first_encoder = clip_convert.load_clip_text(os.path.join(stage, "pipeline", "text_encoder"))
  _, original_encoder = clip_convert.load_clip_text(os.path.join(pipeline_dir, "text_encoder"))
  jax.tree.map(np.testing.assert_array_equal, first_encoder, original_encoder)
  assert not jax.tree.all(jax.tree.map(np.array_equal, encoder, original_encoder))
  # The second stage's checkpoints hold the whole recipe; its base is found from where the workdir is.
  saved = checkpoint.latest_meta(workdir)["config"]
  assert saved["model"]["pretrained"] == pipeline_dir and saved["first_stage"] == list(config.first_stage)
  assert reports == [(pipeline_dir, workdir, summary["pipeline"])]  # once, for the whole recipe
  # A rerun, then one from the moved workdir: both finished stages resume, nothing trains, compiles or is logged.
  compiled = wiring.train_step._cache_size()
  logged = [open(os.path.join(d, "metrics.jsonl")).read() for d in (stage, workdir)]
  run(config, workdir)
  moved = str(tmp_path / "moved")
  os.rename(workdir, moved)
  run(config, moved)
  assert wiring.train_step._cache_size() == compiled
  assert [open(os.path.join(d, "metrics.jsonl")).read() for d in (os.path.join(moved, "first_stage"), moved)] == logged
  exported = run_exports.export_latest(moved, str(tmp_path / "exported"))
  _, again = sd_convert.load_unet(os.path.join(exported["pipeline"], "unet"))
  jax.tree.map(np.testing.assert_array_equal, again, erased)
  # What would separate the text encoder from its UNet is refused: the reference's .pt, a Hub folder.
  for export in (
    lambda: run_exports.export_latest(moved, str(tmp_path / "ref"), fmt="reference"),
    lambda: hub.write_folder(str(tmp_path / "hub"), moved, license_id="mit"),
  ):
    with pytest.raises(ConfigError, match="trained its text encoder over its first stage's UNet"):
      export()
  # A changed first stage, once the second has begun over the old one: refused before anything trains.
  before = sorted(os.listdir(os.path.join(moved, "first_stage", "checkpoints")))
  changed = tiny_config(pipeline_dir, "first_stage=('train.method=xattn', 'train.iterations=4')")
  with pytest.raises(ConfigError, match=r"different config \(first_stage: "):
    run(changed, moved)
  assert sorted(os.listdir(os.path.join(moved, "first_stage", "checkpoints"))) == before


def test_a_begun_second_stage_refuses_a_first_stage_asked_for_other_iterations(pipeline_dir, tmp_path, monkeypatch):
  """train.iterations is resumable, so a first stage that sets none of its own follows the recipe's; once the
  second stage has trained over it, asking the first for more is refused (its checkpoints' metas stand in)."""
  from advunlearn_jax.training import checkpoint, stages

  config = tiny_config(pipeline_dir, "first_stage=('train.method=xattn',)")
  workdir = str(tmp_path / "w")
  os.makedirs(os.path.join(stages.first_stage_dir(workdir), "pipeline"))
  open(os.path.join(stages.first_stage_dir(workdir), "pipeline", "model_index.json"), "w").close()
  metas = {
    workdir: {"config": checkpoint.config_dict(stages.second_stage_config(config))},
    stages.first_stage_dir(workdir): {"config": checkpoint.config_dict(stages.first_stage_config(config))},
  }
  monkeypatch.setattr(checkpoint, "latest_meta", metas.get)
  assert stages.second_stage_begun(stages.second_stage_config(config), workdir)
  longer = stages.second_stage_config(config_lib.override(config, ["train.iterations=6"]))
  with pytest.raises(ConfigError, match="trained 4 iterations and the recipe now asks 6"):
    stages.second_stage_begun(longer, workdir)
  assert not stages.second_stage_begun(stages.second_stage_config(config), str(tmp_path / "fresh"))


@pytest.mark.slow
def test_renewing_bank_run_resumes_with_its_bank(pipeline_dir, tmp_path):
  """The bank (renewed every iteration here) is part of the checkpoint: a resumed run goes on with the same
  trajectories instead of building them again, and ends where an uninterrupted run ends."""
  retain_prompts = tuple(retain.load_dataset("coco_object")[:16])  # the bank rolls out every one at set-up
  overrides = ["train.xt_source=bank", "bank.refresh_every=1", "bank.refresh_retain=2", "train.iterations=3"]
  overrides += ["retain.dataset=", f"retain.prompts={retain_prompts!r}"]
  workdir = str(tmp_path / "run")
  summary = run(tiny_config(pipeline_dir, *overrides), workdir)
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert len(lines) == 3 and all(np.isfinite(m["loss"]) for m in lines)
  assert os.path.isdir(summary["text_encoder"])
  import orbax.checkpoint as ocp

  from advunlearn_jax.training import checkpoint

  args = ocp.args.Composite(state=ocp.args.StandardRestore())
  restored = checkpoint.manager(workdir, 3).restore(3, args=args)["state"]
  assert restored["bank"]["retain"].shape[:3] == (len(retain_prompts), 1, 49)  # the checkpoint holds it
  run(tiny_config(pipeline_dir, *overrides, "train.iterations=5"), workdir)
  straight = str(tmp_path / "straight")
  run(tiny_config(pipeline_dir, *overrides, "train.iterations=5"), straight)
  _, resumed = clip_convert.load_clip_text(os.path.join(workdir, "text_encoder"))
  _, uninterrupted = clip_convert.load_clip_text(os.path.join(straight, "text_encoder"))
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)


def test_rollout_batching_defaults_per_backend():
  """Slots everywhere: 16, or 4 on CPUs at 16x16 latents and up, where a few rows per call are cheapest per row."""
  assert wiring.rollout_rows_per_call(16, "cpu") == wiring.rollout_rows_per_call(64, "cpu") == 4
  assert wiring.rollout_rows_per_call(8, "cpu") == 16  # the tiny world's 8x8: bigger batches are cheaper per row
  assert wiring.rollout_rows_per_call(64, "gpu") == wiring.rollout_rows_per_call(64, "tpu") == 16
  config = tiny_config("/pipe")
  sections = wiring.TrainingSections.from_config(config)
  cfg = wiring.step_config(config, sections, 1, tiny_models.UNET)  # 8x8 latents
  assert (cfg.xt_source, cfg.rollout_buckets, cfg.rollout_rows_per_call) == ("online", 8, 16)
  config.train.rollout_rows_per_call, config.train.rollout_buckets = 0, 5
  cfg = wiring.step_config(config, sections, 1, tiny_models.UNET)
  assert (cfg.rollout_buckets, cfg.rollout_rows_per_call, cfg.bank) == (
    5,
    0,
    bank_lib.BankConfig.from_config(config.bank),
  )


def test_resume_guard_allows_evaluation_and_report_changes_only():
  from advunlearn_jax.errors import ConfigError
  from advunlearn_jax.training import checkpoint

  saved = tiny_config("/pipe").to_dict()
  now = tiny_config("/pipe", "report.erased=('triangle',)").to_dict()
  now["evaluation"]["classifier"] = "judge:shape=star"
  now["evaluation"]["unlearndiff"]["k"] = 5
  checkpoint.check_compatible(saved, now, "/w")  # evaluation.* and report.* do not change what is trained
  with pytest.raises(ConfigError, match="attack.num_tokens"):
    checkpoint.check_compatible(saved, tiny_config("/pipe", "attack.num_tokens=3").to_dict(), "/w")
  # A field added since the checkpoint was written (absent from it) is no change at its default, a change otherwise.
  del saved["attack"]["restart_every"], saved["attack"]["words"]
  checkpoint.check_compatible(saved, now, "/w")
  with pytest.raises(ConfigError, match=r"attack.words: None -> \('church',\)"):
    checkpoint.check_compatible(saved, tiny_config("/pipe", "attack.words=('church',)").to_dict(), "/w")
  # With attack.words (attack.images) empty, word_k (the inversion objective) trains on evaluation.inversion.words
  # (images): a change there is a change of what is trained; a run that reads neither may still change them.
  words, images = "evaluation.inversion.words=('nudity',)", "evaluation.inversion.images=tiny_world:star"
  for attack, changed in ((("attack.type=word_k",), words), (("attack.mix=('objective=both',)",), images)):
    with pytest.raises(ConfigError, match=changed.split("=")[0]):
      checkpoint.check_compatible(
        tiny_config("/pipe", *attack).to_dict(), tiny_config("/pipe", *attack, changed).to_dict(), "/w"
      )
    checkpoint.check_compatible(tiny_config("/pipe").to_dict(), tiny_config("/pipe", changed).to_dict(), "/w")


def _state_files(checkpoint_dir):
  """The files holding a checkpoint's arrays (OCDBT data files), not its small metadata."""
  folder = os.path.join(checkpoint_dir, "state")
  return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names if os.path.basename(d) == "d"]


def test_a_damaged_checkpoint_falls_back_to_the_previous_good_one(pipeline_dir, tmp_path, capsys):
  from advunlearn_jax.errors import CheckpointError
  from advunlearn_jax.training import run_exports

  workdir = str(tmp_path / "run")
  overrides = ["train.iterations=2", "train.warmup_iters=2", "train.save_every=1", "train.log_every=1"]
  run(tiny_config(pipeline_dir, *overrides), workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  for path in _state_files(os.path.join(ckpts, "2")):  # a copy cut short
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  capsys.readouterr()
  # export, a reader, falls back as the run does: it names the damaged step and leaves it where it is
  exported = run_exports.export_latest(workdir, str(tmp_path / "exported"))
  said = capsys.readouterr().out
  assert "checkpoint step 2: " in said and "skipped" in said and "using step 1" in said and "<bound method" not in said
  assert os.path.isdir(exported["text_encoder"]) and sorted(os.listdir(ckpts)) == ["1", "2"]
  summary = run(tiny_config(pipeline_dir, *overrides, "train.iterations=3"), workdir)
  said = capsys.readouterr().out
  assert "checkpoint step 2 is damaged" in said and "resuming from step 1" in said and "<bound method" not in said
  assert summary["resumed_from"] == 1
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # the first attempt's step 2 is gone: one trajectory
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3"]  # step 2 trained and saved again
  assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == ["2"]  # the damaged one kept aside

  # Nothing readable left: the run refuses, names the steps, and moves or writes nothing.
  for step in ("1", "2", "3"):
    for path in _state_files(os.path.join(ckpts, step)):
      os.remove(path)
  whole = r"no checkpoint reads back whole and finite \(step 3: .*step 2: .*step 1: "
  with pytest.raises(CheckpointError, match=whole) as refused:
    run(tiny_config(pipeline_dir, *overrides, "train.iterations=4"), workdir)
  assert "<bound method" not in str(refused.value)
  assert sorted(os.listdir(ckpts)) == ["1", "2", "3"]
  assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == ["2"]


def test_a_diverging_run_stops_before_it_saves_or_exports_nan(pipeline_dir, tmp_path):
  """The loss turns NaN at iteration 3 (the base UNet turns NaN under the run, as train.lr=1e30 turns the trained
  weights): the run stops at the save that would have written it, naming the iteration and the loss terms, and
  every file of the run as it was stays byte for byte (the warm-up step of the tests above: nothing compiles)."""
  import shutil

  from safetensors.numpy import load_file, save_file

  from advunlearn_jax.errors import TrainingDiverged
  from tests.conftest import folder_bytes

  pipe, workdir = str(tmp_path / "pipe"), str(tmp_path / "run")
  shutil.copytree(pipeline_dir, pipe)
  overrides = ["train.iterations=2", "train.warmup_iters=4", "train.save_every=1", "train.log_every=2"]
  run(tiny_config(pipe, *overrides), workdir)
  unet_file = os.path.join(pipe, "unet", "diffusion_pytorch_model.safetensors")
  weights = load_file(unet_file)
  weights = {k: np.full_like(v, np.nan) if k.startswith("conv_in") else v for k, v in weights.items()}
  save_file(weights, unet_file)
  before = folder_bytes(workdir)
  message = r"training diverged at iteration 3 \(loss nan, loss_unlearn nan, loss_retain nan\); nothing after it was"
  with pytest.raises(TrainingDiverged, match=message + r" saved or exported, and the last checkpoint, step 2, is"):
    run(tiny_config(pipe, *overrides, "train.iterations=4"), workdir)
  after = folder_bytes(workdir)
  redrawn = (".lock", "loss.png")  # the lock names its new holder; the plot is redrawn from the same metrics
  assert {k: v for k, v in after.items() if k not in redrawn and not k.startswith("tensorboard")} == {
    k: v for k, v in before.items() if k not in redrawn and not k.startswith("tensorboard")
  }


def _small_state(value: float) -> step_lib.TrainState:
  """A train state of a few numbers, for checkpoint tests that need no model."""
  import jax.numpy as jnp
  import optax

  params = {"w": jnp.full((4,), value, jnp.float32)}
  has_last = jnp.zeros((), bool)
  return step_lib.TrainState(
    jnp.zeros((), jnp.int32), params, optax.adam(1e-3).init(params), jnp.zeros((77, 4)), has_last,
    jnp.zeros((1, 4)), *step_lib.finite_so_far(),
  )  # fmt: skip


def test_a_checkpoint_from_before_the_carried_rows_resumes_with_a_fresh_attack(tmp_path):
  """Format 2 predates TrainState.last_delta: it restores with the initial state's rows and `has_last` cleared, so
  a persistent attack's next round starts from random rows, not from rows it never found."""
  import jax.numpy as jnp

  from advunlearn_jax.training import checkpoint

  workdir = str(tmp_path / "run")
  mngr = checkpoint.manager(workdir, 5)
  older = {k: v for k, v in _small_state(1.0)._replace(has_last=jnp.ones((), bool))._asdict().items()}
  del older["last_delta"]
  meta = ocp.args.JsonSave({"config": {}, "state_format": 2})
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(older), meta=meta))
  mngr.wait_until_finished()
  initial = _small_state(0.0)._replace(last_delta=jnp.full((1, 4), 7.0))
  state, _ = checkpoint.restore_latest(mngr, initial, {}, workdir)
  assert not bool(state.has_last)
  np.testing.assert_array_equal(state.last_delta, np.full((1, 4), 7.0))
  np.testing.assert_array_equal(state.params["w"], np.ones(4))  # the rest is the checkpoint's
  # A run whose `latest` init slices last_sequence (the reference's quirk) never read the rows: it carries on as before.
  quirky = {"attack": {"latest_init_quirk": True}}
  mngr.save(
    2,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(older), meta=ocp.args.JsonSave({"config": quirky, "state_format": 2})
    ),
  )
  mngr.wait_until_finished()
  state, _ = checkpoint.restore_latest(mngr, initial, quirky, workdir)
  assert bool(state.has_last)


def test_a_non_finite_checkpoint_is_refused_as_a_damaged_one(tmp_path, capsys):
  """Checkpoints written with NaN weights (before runs refused to save them) are skipped by export and set aside by
  a resume, which uses the last finite one; with none finite, both refuse and nothing changes. A checkpoint
  written before the state carried its finiteness still restores."""
  from advunlearn_jax.errors import CheckpointError
  from advunlearn_jax.training import checkpoint
  from tests.conftest import folder_bytes

  workdir = str(tmp_path / "run")
  mngr = checkpoint.manager(workdir, 5)
  lacking = ("diverged_at", "diverged_losses", "last_delta")  # format 1
  older = {k: v for k, v in _small_state(1.0)._asdict().items() if k not in lacking}
  mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(older), meta=ocp.args.JsonSave({"config": {}})))
  checkpoint.save(mngr, 2, _small_state(float("nan")), {"config": {}})
  mngr.wait_until_finished()
  step, _, params = checkpoint.latest_readable(workdir)
  said = capsys.readouterr().out
  assert step == 1 and "step 2: not finite: 1 of 1 tensors hold NaN or infinity; skipped" in said
  np.testing.assert_array_equal(params["w"], np.ones(4))
  state, _ = checkpoint.restore_latest(mngr, _small_state(0.0), {}, workdir)
  said = capsys.readouterr().out
  assert "checkpoint step 2 is damaged (not finite: 1 of 3 tensors" in said and "resuming from step 1" in said
  assert int(state.diverged_at) == 0 and float(state.params["w"][0]) == 1.0  # the older format, restored
  assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == ["2"]

  nothing_finite = str(tmp_path / "nan")
  mngr = checkpoint.manager(nothing_finite, 5)
  checkpoint.save(mngr, 1, _small_state(float("inf")), {"config": {}})
  mngr.wait_until_finished()
  before = folder_bytes(nothing_finite)
  with pytest.raises(CheckpointError, match=r"no checkpoint reads back whole and finite \(step 1: not finite"):
    checkpoint.latest_readable(nothing_finite)
  with pytest.raises(CheckpointError, match=r"no checkpoint reads back whole and finite \(step 1: not finite"):
    checkpoint.restore_latest(mngr, _small_state(0.0), {}, nothing_finite)
  assert folder_bytes(nothing_finite) == before


def test_tiny_resolves_at_use_for_population_members_export_and_a_moved_checkout(pipeline_dir, tmp_path, monkeypatch):
  """`model.pretrained="tiny"` is stored as written: a population member's checkpoint exports, and after the
  checkout (and with it the shipped model) moved, the run resumes from it."""
  import shutil

  from advunlearn_jax.training import config_validation, population_runs, run_exports

  checkout_a, checkout_b = str(tmp_path / "a" / "tiny_sd"), str(tmp_path / "b" / "tiny_sd")
  shutil.copytree(pipeline_dir, checkout_a)
  monkeypatch.setattr(config_lib, "TINY_MODEL_DIR", checkout_a)
  config = tiny_config("tiny", "train.iterations=2", "train.warmup_iters=2")
  # On one device, as the runs above: the member reuses their compiled warm-up step instead of compiling one.
  grid = [population_runs.Member("m", config, config_validation.validate(config))]
  results = population_runs.run(grid, str(tmp_path / "pop"), devices=ONE_DEVICE)
  member = str(tmp_path / "pop" / "m")
  assert "error" not in results["m"], results["m"]
  exported = run_exports.export_latest(member, str(tmp_path / "exported"))
  _, ours = clip_convert.load_clip_text(exported["text_encoder"])
  _, trained = clip_convert.load_clip_text(os.path.join(member, "text_encoder"))
  jax.tree.map(np.testing.assert_array_equal, ours, trained)
  # "tiny" meant the (patched) checkout's model, not the package's shipped one: the same shapes as its copy.
  _, copied = clip_convert.load_clip_text(os.path.join(checkout_a, "text_encoder"))
  assert jax.tree.map(np.shape, trained) == jax.tree.map(np.shape, copied)

  shutil.move(os.path.dirname(checkout_a), os.path.dirname(checkout_b))
  monkeypatch.setattr(config_lib, "TINY_MODEL_DIR", checkout_b)
  summary = run(tiny_config("tiny", "train.iterations=3", "train.warmup_iters=2"), member)
  assert summary["resumed_from"] == 2

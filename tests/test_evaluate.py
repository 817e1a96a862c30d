"""Evaluation plumbing: prompt CSVs, the classifier adapters on synthetic inputs, and the evaluate command on
the tiny world."""

import json
import os

import numpy as np
import pytest

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import classifiers, prompt_sets
from advunlearn_jax.tiny import world

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "attack_prompts")


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not part of a user's clone")
def test_reads_the_reference_prompt_csvs():
  church = prompt_sets.read_csv(os.path.join(SHARED, "church.csv"), 0, 7.5)
  assert len(church) == 50 and church[0] == ("0", "Old stone church in countryside.", 69922, 7.5)
  nudity = prompt_sets.read_csv(os.path.join(SHARED, "nudity.csv"), 0, 7.5)
  assert len(nudity) == 142 and nudity[0].seed == 932309623 and nudity[0].guidance == 7.0
  coco = prompt_sets.read_csv(os.path.join(SHARED, "coco_10k.csv"), 0, 7.5)  # no guidance column
  # 9969 rows in 10001 lines: some quoted captions span lines
  assert len(coco) == 9969 and coco[0].case == "000000203564" and coco[0].guidance == 7.5


def test_bad_prompt_csvs_say_where(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("text,evaluation_seed\nhello,1\n")
  with pytest.raises(ConfigError, match="needs a 'prompt' column"):
    prompt_sets.read_csv(str(bad), 0, 7.5)
  bad.write_text("prompt,evaluation_seed\na church,1\na tench,seven\n")
  with pytest.raises(ConfigError, match="bad.csv, line 3"):
    prompt_sets.read_csv(str(bad), 0, 7.5)
  with pytest.raises(ConfigError, match="does not exist"):
    prompt_sets.read_csv(str(tmp_path / "missing.csv"), 0, 7.5)
  with pytest.raises(ConfigError, match="keep one"):
    prompt_sets.from_config(str(bad), ("x",), 0, 7.5, 0, "prompts")
  empty = tmp_path / "empty.csv"
  empty.write_text("")
  with pytest.raises(ConfigError, match=r"empty.csv: needs a 'prompt' column \(evaluation.prompts_column\); the file"):
    prompt_sets.read_csv(str(empty), 0, 7.5)
  from advunlearn_jax.unlearn import retain

  with pytest.raises(ConfigError, match=r"empty.csv has no 'prompt' column \(the file is empty\)"):
    retain.load_csv(str(empty))
  got = prompt_sets.from_config("", ("a", "b", "c"), 5, 3.0, 2, "prompts")
  assert got == [("0", "a", 5, 3.0), ("1", "b", 6, 3.0)]


def test_judge_classifier_on_rendered_images():
  images, attrs, _ = world.batch(seed=123, index=0, n=256)
  images = ((images + 1) * 127.5).round().astype(np.uint8)
  is_triangle = classifiers.make("judge:shape=triangle")
  truth = attrs.shape == world.SHAPES.index("triangle")
  assert np.mean(is_triangle(images) == truth) >= 0.98 and truth.sum() > 10
  with pytest.raises(ConfigError, match="valid values"):
    classifiers.make("judge:shape=hexagon")
  with pytest.raises(ConfigError, match="expected judge:KIND=VALUE"):
    classifiers.make("judge:shape")
  with pytest.raises(ValueError, match="uint8 images"):
    is_triangle(images.astype(np.float32))


def test_nudenet_missing_package_is_an_actionable_error():
  try:
    import nudenet  # noqa: F401
  except ImportError:
    with pytest.raises(ConfigError, match="pip install nudenet onnxruntime"):
      classifiers.make("nudenet")
  else:
    pytest.skip("nudenet is installed here")


@pytest.fixture(scope="module")
def resnet_folder(tmp_path_factory):
  """A tiny random transformers ResNet image classifier with 5 named classes, as a user's local folder."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  labels = {i: name for i, name in enumerate(["tench", "church", "parachute", "golf ball", "chain saw"])}
  config = transformers.ResNetConfig(
    embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5, id2label=labels,
    label2id={v: k for k, v in labels.items()},
  )  # fmt: skip
  folder = str(tmp_path_factory.mktemp("resnet"))
  transformers.ResNetForImageClassification(config).save_pretrained(folder)
  transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=1.0).save_pretrained(folder)
  return folder


def test_hf_image_classifier_top_k(resnet_folder):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  by_name = classifiers.make(f"hf:{resnet_folder}:church")
  logits = by_name.logits(images)
  assert logits.shape == (6, 5)
  top1 = logits.argmax(-1)
  assert by_name(images).tolist() == (top1 == 1).tolist()
  assert classifiers.make(f"hf:{resnet_folder}:1")(images).tolist() == (top1 == 1).tolist()
  top3 = np.argsort(-logits, -1)[:, :3]
  both = classifiers.make(f"hf:{resnet_folder}:Church,tench:3")(images)
  assert both.tolist() == [bool({0, 1} & set(row)) for row in top3.tolist()]
  assert classifiers.make(f"hf:{resnet_folder}:0,1,2,3,4:1")(images).all()
  with pytest.raises(ConfigError, match="no class named 'van-gogh'"):
    classifiers.make(f"hf:{resnet_folder}:van-gogh")
  with pytest.raises(ConfigError, match="outside"):
    classifiers.make(f"hf:{resnet_folder}:7")
  with pytest.raises(ConfigError, match="no config.json"):
    classifiers.make(f"hf:{resnet_folder}/nowhere:1")


@pytest.mark.slow  # ~100 s on 2 cores; keeps the default suite inside CI's 15 minutes
def test_evaluate_command_on_the_tiny_world(tmp_path):
  """The evaluate entry point end to end on the shipped model (short attack): report, grids, accounting."""
  import configs.tiny as tiny_config
  from advunlearn_jax.diffusion import generation
  from advunlearn_jax.evals import evaluation
  from tests import torch_oracles

  config = tiny_config.get_config()
  config.evaluation.prompts = ("a photo of a plain red triangle", "a photo of a plain blue circle")
  config.evaluation.unlearndiff.iters_per_t = 3
  config.evaluation.unlearndiff.timesteps = (10, 500)
  config.evaluation.budgets = (3, 6)
  config.report.images_per_value = 2
  config.evaluation.clip_model = str(tmp_path / "clip")
  torch_oracles.write_clip_model(config.evaluation.clip_model)
  (tmp_path / "captions.csv").write_text("case_number,prompt,evaluation_seed\n7,a red star,3\n8,a blue heart,4\n")
  config.evaluation.captions = str(tmp_path / "captions.csv")
  config.evaluation.fid = "clip"
  config.evaluation.utility_scheduler = "ddim"
  config.evaluation.utility_steps = 5
  config.evaluation.real_images = str(tmp_path / "real")
  for i, (w, h) in enumerate([(40, 32), (32, 48), (64, 64)]):  # mixed sizes, as COCO's are
    generation.save_png(str(tmp_path / "real" / f"{i}.png"), np.full((h, w, 3), 60 * i, np.uint8))
  lines = []
  report = evaluation.evaluate(config, str(tmp_path), log=lines.append)
  s = report["robustness"]["summary"]
  per = report["robustness"]["per_prompt"]
  assert s["prompts"] == 2 and len(lines) == 2 and len(per) == 2
  assert per[0]["pre_success"] and per[0]["iterations"] == 0  # the base model draws the triangle
  assert not per[1]["pre_success"] and per[1]["iterations"] in (3, 6)  # a circle: attacked
  assert 0.5 <= s["pre_asr"] <= s["asr"] <= 1.0
  curve = report["robustness"]["budget_curve"]  # the circle's attack stopped at its first success
  assert curve == [[0, s["pre_asr"]], [3, 0.5 + 0.5 * (per[1]["success"] and per[1]["iterations"] == 3)], [6, s["asr"]]]
  assert (tmp_path / "asr_vs_budget.png").is_file()
  on_disk = json.loads((tmp_path / "report.json").read_text())
  assert on_disk["robustness"]["summary"] == s
  utility = on_disk["utility"]
  assert utility["tiny_world_erased_before"] == utility["tiny_world_erased_after"]  # the base model itself
  assert -1 <= utility["clip_score"] <= 1 and utility["captions"] == 2
  assert utility["fid"] > 0 and utility["fid_features"] == "clip"
  assert (tmp_path / "utility_samples.png").is_file()
  assert "pre-ASR 50.0%" in (tmp_path / "report.md").read_text()
  assert (tmp_path / "targets_and_final.png").is_file()
  with pytest.raises(ConfigError, match="both set"):
    evaluation.evaluate(config, str(tmp_path), text_encoder="a", pipeline="b")


def _quick_tiny_config():
  """The tiny model with the fewest sampling steps: what these tests check is the plumbing, not the images."""
  import configs.tiny as tiny_config

  config = tiny_config.get_config()
  config.evaluation.prompts = ()
  config.evaluation.target_steps = 2
  config.evaluation.unlearndiff.steps = 2
  config.report.kind = ""
  return config


def test_an_over_long_prompt_is_skipped_and_reported_the_rest_evaluated(tmp_path):
  from advunlearn_jax.evals import evaluation

  config = _quick_tiny_config()
  long = "a photo of " + "red " * 60
  rows = [(0, "a photo of a plain red triangle"), (1, long), (2, "a photo of a plain blue circle")]
  csv_path = tmp_path / "prompts.csv"
  csv_path.write_text(
    "case_number,prompt,evaluation_seed,evaluation_guidance\n" + "".join(f"{c},{p},{c},5.0\n" for c, p in rows)
  )
  config.evaluation.prompts_csv = str(csv_path)
  lines = []
  report = evaluation.evaluate(config, str(tmp_path / "out"), attack=False, log=lines.append)
  r = report["robustness"]
  assert [p["case"] for p in r["per_prompt"]] == ["0", "2"] and r["summary"]["prompts"] == 2
  assert [k["case"] for k in r["skipped"]] == ["1"] and "65 tokens > 60" in r["skipped"][0]["reason"]
  assert lines[0].startswith("skipped case 1 (65 tokens > 60") and len(lines) == 3
  assert lines[1].startswith("[1/2] ") and ", ETA " in lines[1] and ", ETA 0s)" in lines[2]  # what is left, per prompt
  assert "Skipped 1 prompts, as the official loader does" in (tmp_path / "out" / "report.md").read_text()
  # Every prompt is screened before anything is generated: nothing left is an error, and no output is written.
  csv_path.write_text(f"prompt\n{long}\n")
  with pytest.raises(ConfigError, match="every one of the 1 evaluation prompts was skipped"):
    evaluation.evaluate(config, str(tmp_path / "none"), attack=False)
  assert not (tmp_path / "none").exists()


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is not part of a user's clone")
def test_evaluate_gets_through_the_reference_nudity_prompts(tmp_path):
  """The 142 I2P prompts of UnlearnDiffAtk's nudity.csv, some longer than its loader takes, through the CLI on the
  tiny model (its judge standing in for NudeNet) without the attack: every prompt is rendered or skipped."""
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  csv_path = os.path.join(SHARED, "nudity.csv")
  overrides = ["prompts=()", f"prompts_csv={csv_path}", "target_steps=2", "unlearndiff.steps=2"]
  proc = subprocess.run(
    [sys.executable, "-m", "advunlearn_jax.evaluate", "--config=configs/tiny.py", "--config.report.kind=",
     *[f"--config.evaluation.{o}" for o in overrides], "--no_attack", f"--out={tmp_path}"],
    cwd=root, capture_output=True, text=True, timeout=900,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads((tmp_path / "report.json").read_text())["robustness"]
  assert r["summary"]["prompts"] + len(r["skipped"]) == 142 and r["skipped"]
  assert all("> 60, the official loader's limit" in k["reason"] for k in r["skipped"])


def test_evaluate_cli_flags():
  """The command's flags are its own: the libraries define none (so importing them next to any command does not
  clash), and the command still asks for --out."""
  import subprocess
  import sys

  from advunlearn_jax.evals import evaluation  # noqa: F401  the command's library defines no flags
  from advunlearn_jax.training import hub, run_exports  # noqa: F401  the export command's libraries define no flags

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
    [sys.executable, "-m", "advunlearn_jax.evaluate", "--config=configs/tiny.py"],
    cwd=root, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  assert proc.returncode != 0 and "--out" in proc.stderr


def test_released_prompts_run_again_on_any_model_and_reproduce_where_found(tmp_path):
  """An attack's adversarial_prompts.csv (UnlearnDiffAtk's here; every discrete attack writes the same file) as
  the prompt set of an unattacked evaluation: on the model it was found on, each case shows exactly what it
  showed, success for success; on another model (an encoder with other weights) the same rows are rendered."""
  import csv

  import jax

  from advunlearn_jax import config_lib
  from advunlearn_jax.convert import clip_text
  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.evals import evaluation, found_prompts

  config = _quick_tiny_config()
  config.evaluation.prompts = (
    "a photo of a plain red triangle",
    "a photo of a plain blue circle",
    "a photo of a heart",
  )
  config.evaluation.unlearndiff.iters_per_t = 3
  config.evaluation.unlearndiff.timesteps = (10, 500)
  found = evaluation.evaluate(config, str(tmp_path / "found"), log=lambda _: None)["robustness"]
  assert found["released"] == [found_prompts.CSV_NAME]
  path = tmp_path / "found" / found_prompts.CSV_NAME
  rows = list(csv.DictReader(path.open()))
  assert [r["prompt"] for r in rows] == list(config.evaluation.prompts) and {r["attack"] for r in rows} == {
    "unlearndiff"
  }
  for r, p in zip(rows, found["per_prompt"]):
    assert (r["success"], r["pre_success"]) == (str(int(p["success"])), str(int(p["pre_success"])))
    assert r["adv_prompt"] == (p["adv_prompt"] or p["prompt"]) and int(r["budget"]) == p["iterations"]
  config.evaluation.prompts, config.evaluation.prompts_csv = (), str(path)
  config.evaluation.prompts_column = "adv_prompt"
  replay = evaluation.evaluate(config, str(tmp_path / "replay"), attack=False, log=lambda _: None)["robustness"]
  assert [p["pre_success"] for p in replay["per_prompt"]] == [p["success"] for p in found["per_prompt"]]
  assert [p["prompt"] for p in replay["per_prompt"]] == [r["adv_prompt"] for r in rows]
  assert [(p["case"], p["seed"]) for p in replay["per_prompt"]] == [
    (r["case_number"], int(r["evaluation_seed"])) for r in rows
  ]
  base = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  noisy = jax.tree_util.tree_map(
    lambda a: a + 0.05 * np.random.default_rng(0).standard_normal(a.shape, a.dtype), base.text_params
  )
  clip_text.export_clip_text(base.text_config, noisy, str(tmp_path / "other"))
  other = evaluation.evaluate(
    config, str(tmp_path / "other_replay"), text_encoder=str(tmp_path / "other"), attack=False, log=lambda _: None
  )["robustness"]
  assert other["summary"]["prompts"] == 3 and [p["prompt"] for p in other["per_prompt"]] == [
    r["adv_prompt"] for r in rows
  ]
  config.evaluation.prompts_column = "adversarial"
  with pytest.raises(ConfigError, match="needs a 'adversarial' column \\(evaluation.prompts_column\\)"):
    evaluation.evaluate(config, str(tmp_path / "nothing"), attack=False)


def test_ring_a_bell_released_k77_prompts_run_unchanged(tmp_path):
  """Ring-A-Bell's released CSVs (data/InvPrompt/Violence/*.csv: prompt, case_number, evaluation_seed; the K = 77
  prompts re-tokenise to up to 90 tokens) run as they are: no attack puts a token in front, so a long prompt is
  cut at 77 tokens as pipelines cut it, not skipped."""
  from advunlearn_jax.evals import evaluation

  config = _quick_tiny_config()
  long = " ".join(["armed capable bids neighbor glory amour shooter bloody holes murder"] * 9)  # ~90 tokens
  (tmp_path / "ring.csv").write_text(f"prompt,case_number,evaluation_seed\n{long},5,41\na red heart,6,14\n")
  config.evaluation.prompts_csv = str(tmp_path / "ring.csv")
  config.evaluation.max_prompt_tokens = 0
  report = evaluation.evaluate(config, str(tmp_path / "out"), attack=False, log=lambda _: None)["robustness"]
  assert [(p["case"], p["seed"]) for p in report["per_prompt"]] == [("5", 41), ("6", 14)] and not report["skipped"]

"""Concept inversion on the shipped tiny model, the ASR-against-budget accounting and its plot."""

import json

import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import attacks, budgets, classifiers, inversion, prompt_sets, unlearndiff
from advunlearn_jax.evals import unlearndiff as ud
from advunlearn_jax.tiny import world


@pytest.fixture(scope="module")
def tiny():
  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.tiny import quality

  return sd_convert.load_pipeline(quality.TINY_SD_DIR)


def _settings(*overrides: str) -> inversion.InversionConfig:
  """Inversion's settings at config_lib's defaults (InversionConfig has none of its own) with `overrides`
  ("section.field=value"), CCE's initializer "shape" unless they name another."""
  items = ["evaluation.inversion.cce.initializer=shape", *overrides]
  return inversion.InversionConfig.from_config(config_lib.override(config_lib.base_config(), items))


def _shapeless_prompts():
  """Prompts that name a colour and a style but no shape: the base model draws any of the six shapes."""
  combos = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0), (5, 1), (0, 2), (1, 3)]
  return prompt_sets.inline([world.canonical_prompt(color=c, style=s) for c, s in combos], seed=100, guidance=5.0)


def _square_prompts():
  """Prompts that name a square: the base model draws squares, and `word` placement has a word to replace."""
  combos = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 0), (5, 1), (0, 2), (1, 3)]
  square = world.ATTRIBUTE_TYPES["shape"].index("square")
  prompts = [world.canonical_prompt(shape=square, color=c, style=s) for c, s in combos]
  return prompt_sets.inline(prompts, seed=100, guidance=5.0)


def _random_token_asr(tiny, prompts, cfg, sampler, is_triangle):
  """k random vocabulary tokens where the attack puts its learned ones (cfg.placement), 4 draws per prompt."""
  tokenizer = tok_lib.load_tokenizer(tiny.tokenizer_dir)
  rng = np.random.default_rng(0)
  hits = []
  for p in prompts:
    ids, which = inversion.slotted_ids(tokenizer, inversion.prompt_pieces(p.prompt, cfg), cfg.tokens)
    seqs = np.repeat(ids[None], 4, 0)
    seqs[:, which >= 0] = rng.integers(0, 49406, (4, int((which >= 0).sum())))
    hits += list(is_triangle(ud.render_ids(tiny, seqs, p.seed, 5.0, sampler, tiny.text_params)))
  return float(np.mean(hits))


def test_cce_in_the_words_place_brings_the_concept_back_where_a_random_token_does_not(tiny):
  """The published protocol on the base tiny model: one token initialised from "shape", 25 rendered triangles,
  their object templates, the token rendered where the prompt's shape word stood ("a photo of a striped red
  <token>"). Measured: 2/8 prompts that name a square show a triangle at 10 steps, 8/8 at 50; one random token
  in the same place: none of 32 images."""
  is_triangle = classifiers.make("judge:shape=triangle")
  prompts = _square_prompts()
  cfg = _settings(
    "evaluation.inversion.protocol=cce",
    "evaluation.inversion.words=('square',)",
    "evaluation.inversion.cce.templates=object",
    "evaluation.inversion.cce.steps=50",
    "evaluation.budgets=(10, 50)",
    "evaluation.inversion.scheduler=ddim",
    "evaluation.inversion.sample_steps=25",
  )
  images = inversion.concept_images("tiny_world:triangle", cfg.max_images, 32)
  result = inversion.attack_prompts(tiny, prompts, images, is_triangle, cfg, seed=0, log=lambda _: None)
  learned = np.mean([o.success for o in result.outcomes])
  assert not any(o.pre_success for o in result.outcomes) and set(result.learned) == {10, 50}
  for o in result.outcomes:  # the prompt with its square replaced by the learned token, shown by its nearest word
    assert o.adv_prompt == o.prompt.replace("square", f"<{o.adv_tokens}>") and "square" not in o.adv_prompt
  assert learned >= 0.75 and _random_token_asr(tiny, prompts, cfg, cfg.sampler, is_triangle) <= 0.25


def test_word_placement_puts_the_token_where_the_concept_words_stood():
  """Every other token unchanged: the prompt's own ids with the concept's tokens replaced by the slot (a
  three-token phrase by one slot, the longest listed phrase first), and the embedding only there."""
  from advunlearn_jax.tiny import quality

  tokenizer = tok_lib.load_tokenizer(quality.TINY_SD_DIR + "/tokenizer")
  word = _settings("evaluation.inversion.words=('triangle', 'Van Gogh', 'Vincent van Gogh')")
  prompt = "a photo of a red Triangle, by Vincent van Gogh, a triangle again"
  ids, which = inversion.slotted_ids(tokenizer, inversion.prompt_pieces(prompt, word), 1)
  ref = tok_lib.tokenize(tokenizer, [prompt])[0]
  tokens = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
  (tri,), vvg = tokens("triangle"), tokens("Vincent van Gogh")
  expected, i = [], 0
  while i < len(ref):  # the reference ids, each concept phrase collapsed to one placeholder 0
    if ref[i] == tri or list(ref[i : i + 3]) == vvg:
      expected.append(0)
      i += 1 if ref[i] == tri else 3
    else:
      expected.append(int(ref[i]))
      i += 1
  n = len(expected)
  assert ids[:n].tolist() == expected and (ids[n:] == ref[-1]).all() and len(vvg) == 3
  assert np.flatnonzero(which >= 0).tolist() == [i for i, t in enumerate(expected) if t == 0] and len(set(which)) == 2
  assert inversion.adversarial_prompt(prompt, word, "tok") == "a photo of a red <tok>, by <tok>, a <tok> again"
  # a plural, a hyphen or a run of spaces between the words still name the concept; a longer word does not
  assert inversion.adversarial_prompt("Triangles by van-Gogh, triangular", word, "t") == "<t> by <t>, triangular"

  rng = np.random.default_rng(0)
  words, learned = rng.normal(size=(77, 8)).astype(np.float32), rng.normal(size=(1, 8)).astype(np.float32)
  seq = np.asarray(inversion.place(words, which, learned))
  assert (seq[which >= 0] == learned[0]).all() and (seq[which < 0] == words[which < 0]).all()

  prefix = word._replace(placement="prefix", tokens=3)  # the I2P generator's "<token> prompt"
  ids, which = inversion.slotted_ids(tokenizer, inversion.prompt_pieces(prompt, prefix), 3)
  assert np.array_equal(ids, ud.prefix_ids(ref, 3, 0)) and which[:5].tolist() == [-1, 0, 1, 2, -1]
  assert inversion.adversarial_prompt(prompt, prefix, "tok") == f"<tok> {prompt}"
  with pytest.raises(
    ConfigError, match=r"'a photo of a plain red square' holds none of the concept's words \['triangle'\]"
  ):
    inversion.check_prompts(word._replace(words=("triangle",)), _square_prompts()[:1])


def test_prefix_inversion_learns_a_prefix_that_random_tokens_are_not(tiny):
  """This project's earlier variant: from 64 rendered triangles, 3 learned embeddings make the judge see a
  triangle in prompts that name no shape; 3 random vocabulary tokens in the same place do not. Measured: 7/8
  prompts at 25 steps and 8/8 at 50 (random prefixes: 0 of 32 images)."""
  is_triangle = classifiers.make("judge:shape=triangle")
  prompts = _shapeless_prompts()
  cfg = _settings(
    "evaluation.inversion.protocol=prefix",
    "evaluation.inversion.placement=prefix",
    "evaluation.inversion.prefix.tokens=3",
    "evaluation.inversion.prefix.lr=5e-3",
    "evaluation.inversion.prefix.batch=4",
    "evaluation.budgets=(25, 50)",
    "evaluation.inversion.scheduler=ddim",
    "evaluation.inversion.sample_steps=25",
  )
  images = inversion.concept_images("tiny_world:triangle", 64, 32)
  assert is_triangle(images).mean() > 0.9  # the training images show the concept
  result = inversion.attack_prompts(tiny, prompts, images, is_triangle, cfg, seed=0, log=lambda _: None)
  learned = np.mean([o.success for o in result.outcomes])
  assert not any(o.pre_success for o in result.outcomes)
  assert all(o.iterations in (25, 50) and o.adv_prompt.endswith(o.prompt) for o in result.outcomes)
  assert set(result.learned) == {25, 50} and len(result.losses) == 2

  random_asr = _random_token_asr(tiny, prompts, cfg, cfg.sampler, is_triangle)
  assert learned >= 0.75 and random_asr <= 0.25, (learned, random_asr)

  curve = budgets.asr_curve(result.outcomes, cfg.budgets)
  assert [b for b, _ in curve] == [0, 25, 50]
  assert all(a <= b for (_, a), (_, b) in zip(curve, curve[1:]))  # stops at the first success: monotone
  assert curve[-1][1] == learned


# The published settings, read from NYU-DICE-Lab/circumventing-concept-erasure (esd/train.sh and the argparse
# defaults of esd/concept_inversion.py): (field of InversionConfig, value).
PUBLISHED_CCE = [
  # the token where the concept's words stood: the placeholder in their templates (concept_inversion.py:533-534),
  # and the concept rendered from a prompt written around it (generate_images.py:39); prefix only for I2P
  # prompts, which name no concept word (generate_i2p.py:41-44)
  ("placement", "word"),
  ("tokens", 1),  # --num_vectors default 1; train.sh sets none
  ("steps", 5000),  # train.sh --max_train_steps
  ("batch", 4),  # train.sh --train_batch_size
  ("accumulation", 4),  # train.sh --gradient_accumulation_steps
  ("lr", 5e-3),  # train.sh --learning_rate
  ("scale_lr", True),  # train.sh --scale_lr
  ("effective_lr", 0.08),  # 5e-3 x 4 x 4 x 1 process (concept_inversion.py:800-803)
  ("weight_decay", 1e-2),  # --adam_weight_decay
  ("beta1", 0.9),  # --adam_beta1
  ("beta2", 0.999),  # --adam_beta2
  ("eps", 1e-8),  # --adam_epsilon
  ("flip_p", 0.5),  # TextualInversionDataset(flip_p=0.5)
  ("max_images", 25),  # train.sh --num_train_images
]


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["evaluation.inversion.cce.steps=0"], r"config.evaluation.inversion.cce needs tokens, steps, batch and images"),
    (["evaluation.inversion.protocol=prefix", "evaluation.inversion.prefix.tokens=0"], r"inversion.prefix needs"),
    # cce's own knob names cce's section, whichever protocol reads the settings
    (["evaluation.inversion.protocol=prefix", "evaluation.inversion.cce.accumulation=0"], r"cce.accumulation must"),
  ],
)
def test_bad_inversion_settings_name_their_section(overrides, message):
  with pytest.raises(ConfigError, match=message):
    _settings(*overrides)


@pytest.mark.parametrize("field, value", PUBLISHED_CCE)
def test_cce_defaults_are_the_published_settings(field, value):
  config = config_lib.base_config()
  config.evaluation.attack = "inversion"
  config.evaluation.inversion.cce.initializer = "art"
  cfg = inversion.InversionConfig.from_config(config)
  assert cfg.protocol == "cce" and getattr(cfg, field) == (value if isinstance(value, str) else pytest.approx(value))


def test_cce_templates_schedule_and_optimiser_follow_their_code():
  torch = pytest.importorskip("torch")
  assert [len(inversion.TEMPLATES[k]) for k in ("object", "style", "person")] == [27, 19, 2]
  assert inversion.TEMPLATES["object"][0] == "a photo of a {}" and inversion.TEMPLATES["style"][-1].startswith(
    "a large"
  )
  from advunlearn_jax.tiny import quality

  tokenizer = tok_lib.load_tokenizer(quality.TINY_SD_DIR + "/tokenizer")
  ids, which = inversion.template_ids(tokenizer, ["a photo of a {}", "{} on a table"])
  ref = tok_lib.tokenize(tokenizer, ["a photo of a triangle", "triangle on a table"])
  triangle = tokenizer("triangle", add_special_tokens=False)["input_ids"][0]
  assert [np.flatnonzero(w >= 0).tolist() for w in which] == [[5], [1]]
  assert np.array_equal(np.where(ids == 0, triangle, ids), ref)
  with pytest.raises(ConfigError, match="is 2 tokens; CCE needs a single-token word"):
    inversion.initializer_id(tokenizer, "van gogh")

  cfg = _settings("evaluation.inversion.cce.steps=400")
  data = inversion.cce_schedule(25, 27, cfg, seed=0)
  first_epoch = data["image"].reshape(-1)[: 25 * inversion.REPEATS]
  assert data["image"].shape == (400, 4, 4) and np.bincount(first_epoch).tolist() == [100] * 25
  assert abs(data["flip"].mean() - 0.5) < 0.02 and data["template"].max() == 26

  # optax's adamw on the one learned row equals torch's AdamW with their settings, step by step
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(5, 8)).astype(np.float32)
  start = rng.normal(size=8).astype(np.float32)
  p = torch.nn.Parameter(torch.from_numpy(start.copy()))
  opt = torch.optim.AdamW([p], lr=0.08, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
  import optax

  tx = optax.adamw(0.08, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)
  ours, state = start.copy(), tx.init(start)
  for g in grads:
    p.grad = torch.from_numpy(g.copy())
    opt.step()
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
  np.testing.assert_allclose(ours, p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_concept_images_from_a_folder_are_centre_cropped_to_the_model_size(tmp_path):
  from PIL import Image

  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, 10:30] = 255  # the centre square is white, the side bands black
  Image.fromarray(wide).save(tmp_path / "a.png")
  Image.fromarray(np.full((50, 30, 3), 90, np.uint8)).save(tmp_path / "b.jpg", quality=100)
  (tmp_path / "notes.txt").write_text("not an image")
  images = inversion.concept_images(str(tmp_path), 0, 16)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert images[0].min() == 255 and np.abs(images[1].astype(int) - 90).max() <= 2
  assert len(inversion.concept_images(str(tmp_path), 1, 16)) == 1
  squashed = inversion.concept_images(str(tmp_path), 1, 16, center_crop=False)  # CCE resizes the whole image
  assert squashed[0, :, 0].max() < 60 and squashed[0, :, 8].min() == 255
  with pytest.raises(ConfigError, match="config.evaluation.inversion.images: image folder .* does not exist"):
    inversion.concept_images(str(tmp_path / "none"), 0, 16)


def _outcome(pre, success, iterations):
  return ud.Outcome("p", 0, 5.0, pre, success, "", "", -1, iterations, 1.0, np.zeros((1, 1, 3), np.uint8))


def test_asr_curve_counts_pre_successes_and_first_successes_within_each_budget():
  outcomes = [
    _outcome(True, True, 0),
    _outcome(False, True, 40),
    _outcome(False, True, 120),
    _outcome(False, False, 200),
  ]
  assert budgets.asr_curve(outcomes, (200, 40, 80)) == [[0, 0.25], [40, 0.5], [80, 0.5], [200, 0.75]]
  ev = config_lib.override(config_lib.base_config(), ["evaluation.unlearndiff.iters_per_t=20"]).evaluation
  blocks = unlearndiff.UnlearnDiffConfig.from_config(ev)._replace(timesteps=tuple(range(10)))
  unlearndiff.check_budgets((20, 200), blocks)
  with pytest.raises(ConfigError, match=r"\[30, 220\]: UnlearnDiffAtk budgets are attack iterations, multiples"):
    unlearndiff.check_budgets((20, 30, 220), blocks)


def test_budget_plot_for_several_models(tmp_path):
  for name, curve in (("esd", [[0, 0.2], [20, 0.6]]), ("adv", [[0, 0.1], [20, 0.2]])):
    report = {"robustness": {"attack_name": "unlearndiff", "budget_curve": curve}}
    (tmp_path / f"{name}.json").write_text(json.dumps(report))
  curves, xlabel = budgets.from_reports([f"ESD={tmp_path / 'esd.json'}", str(tmp_path / "adv.json")])
  assert list(curves) == ["ESD", str(tmp_path / "adv.json")] and xlabel == attacks.UnlearnDiffAtk.budget_label
  budgets.plot(curves, str(tmp_path / "asr.png"), xlabel)
  from PIL import Image

  assert Image.open(tmp_path / "asr.png").size == (720, 480)
  (tmp_path / "inv.json").write_text(json.dumps({"robustness": {"attack_name": "inversion", "budget_curve": [[0, 0]]}}))
  with pytest.raises(ConfigError, match="different attacks"):
    budgets.from_reports([str(tmp_path / "esd.json"), str(tmp_path / "inv.json")])
  (tmp_path / "none.json").write_text(json.dumps({"robustness": {"attack_name": "inversion", "budget_curve": []}}))
  with pytest.raises(ConfigError, match="no budget curve"):
    budgets.from_reports([str(tmp_path / "none.json")])


def test_evaluate_with_inversion_writes_the_usual_report(tmp_path):
  """`--config.evaluation.attack=inversion` through evaluate: the same report, plus the budget curve and plot."""
  import configs.tiny as tiny_config
  from advunlearn_jax.evals import evaluation
  from advunlearn_jax.training import config_validation

  config = tiny_config.get_config("triangle")
  config.evaluation.attack = "inversion"
  config.evaluation.prompts = tuple(p.prompt for p in _square_prompts()[:3]) + ("a photo of a red triangle",)
  config.evaluation.inversion.words = ("square", "triangle")  # the learned token stands where either stood
  config.evaluation.inversion.cce.steps = 20
  config.evaluation.inversion.sample_steps = 10
  config.evaluation.budgets = (10, 20)
  config.report.kind = ""
  config_validation.validate(config)
  lines = []
  report = evaluation.evaluate(config, str(tmp_path), log=lines.append)
  r = report["robustness"]
  assert r["attack_name"] == "inversion" and r["attack"]["tokens"] == 1 and r["summary"]["prompts"] == 4
  assert (
    r["attack"]["protocol"] == "cce" and r["attack"]["initializer"] == "shape" and r["attack"]["effective_lr"] == 0.08
  )
  assert r["attack"]["placement"] == "word" and list(r["attack"]["words"]) == ["square", "triangle"]
  assert report["protocol"]["attack"]["placement"] == "word"
  assert report["protocol"]["attack"]["templates"] == "object" and report["protocol"]["classifier"]["spec"].startswith(
    "judge"
  )
  assert r["per_prompt"][3]["pre_success"]  # the base model draws the named triangle unattacked
  assert [b for b, _ in r["budget_curve"]] == [0, 10, 20] and r["budget_curve"][0][1] == r["summary"]["pre_asr"]
  assert r["budget_curve"][-1][1] == r["summary"]["asr"]
  # training stops once every prompt is shown: the 20-step checkpoint runs only if a prompt is left
  assert "10" in r["inversion"]["nearest_words"] and set(r["inversion"]["nearest_words"]) <= {"10", "20"}
  assert r["inversion"]["images"] == 25
  assert (tmp_path / "asr_vs_budget.png").is_file() and (tmp_path / "targets_and_final.png").is_file()
  text = (tmp_path / "report.md").read_text()
  title = "CCE concept inversion (1 learned embeddings in the concept word's place, 20 steps)"
  assert title in text and "| budget | 0 | 10 | 20 |" in text and "attack.placement: word" in text
  assert "Protocol:" in text and "attack.effective_lr: 0.08" in text
  assert any(line.startswith("inversion (cce): 10 steps") for line in lines)
  # The learned embedding is released and renders in the same places without training: the same verdicts.
  assert r["released"] == [inversion.LEARNED_NAME]
  config.evaluation.inversion.learned = str(tmp_path / inversion.LEARNED_NAME)
  again = evaluation.evaluate(config, str(tmp_path / "again"), log=lambda _: None)["robustness"]
  assert [p["success"] for p in again["per_prompt"]] == [p["success"] for p in r["per_prompt"]]
  assert again["inversion"]["nearest_words"] == r["inversion"]["nearest_words"] and again["inversion"]["images"] == 0
  config.evaluation.inversion.placement = "prefix"
  with pytest.raises(ConfigError, match="learned as protocol='cce', placement='word' with 1 token"):
    evaluation.evaluate(config, str(tmp_path / "elsewhere"), log=lambda _: None)
  config.evaluation.inversion.placement, config.evaluation.inversion.words = "word", ("triangle", "square")
  with pytest.raises(ConfigError, match=r"for the words \['square', 'triangle'\]; .* for \['triangle', 'square'\]"):
    evaluation.evaluate(config, str(tmp_path / "elsewhere"), log=lambda _: None)
  config.evaluation.inversion.learned = ""
  config.evaluation.attack = "textual"
  with pytest.raises(ConfigError, match="evaluation.attack is 'textual'; expected one of"):
    config_validation.validate(config)
  config.evaluation.attack, config.evaluation.budgets = "unlearndiff", (25,)
  with pytest.raises(ConfigError, match="multiples of unlearndiff.iters_per_t=20"):
    config_validation.validate(config)


def test_inversion_trains_nothing_when_every_prompt_already_shows_the_concept(tiny):
  """Each prompt's attack stops at its first success; when the unattacked images all succeed, no step is paid."""
  prompts = prompt_sets.inline(
    ["a photo of a red triangle", "a photo of a striped blue triangle"], seed=3, guidance=5.0
  )
  cfg = _settings(
    "evaluation.inversion.words=('triangle',)",
    "evaluation.inversion.cce.steps=5000",
    "evaluation.inversion.scheduler=ddim",
    "evaluation.inversion.sample_steps=10",
  )
  images = inversion.concept_images("tiny_world:triangle", cfg.max_images, 32)
  result = inversion.attack_prompts(tiny, prompts, images, classifiers.make("judge:shape=triangle"), cfg)
  assert all(o.pre_success and o.success for o in result.outcomes)
  assert result.losses == [] and result.train_seconds == 0.0

"""The tiny world: the renderer and captions, the shipped judge and model, and the diffusers round trip."""

import importlib.util
import os

import numpy as np
import pytest

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.diffusion import generation
from advunlearn_jax.tiny import judge as judge_lib
from advunlearn_jax.tiny import quality, report, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config_module():
  spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_batches_are_seeded_and_cover_the_world():
  images, attrs, captions = world.batch(seed=3, index=7, n=256)
  again, _, captions_again = world.batch(seed=3, index=7, n=256)
  np.testing.assert_array_equal(images, again)
  assert captions == captions_again
  assert images.shape == (256, 32, 32, 3) and images.dtype == np.float32
  assert -1.0 <= images.min() and images.max() <= 1.0
  for values, column in zip((world.SHAPES, world.COLORS, world.STYLES), attrs):
    assert set(column) == set(range(len(values)))
  assert len(world.SHAPES) >= 6 and len(world.COLORS) >= 6 and len(world.STYLES) >= 4
  for i, text in enumerate(captions):
    assert any(w in text for w in world.SHAPE_WORDS[world.SHAPES[attrs.shape[i]]]), text
    assert "  " not in text and not text.endswith(" in")
    named_colors = [c for c in world.COLORS if c in text.split()]
    assert named_colors in ([], [world.COLORS[attrs.color[i]]]), text


def test_shapes_differ_and_textures_show():
  rng = np.random.default_rng(0)
  n = len(world.SHAPES)
  plain_red = world.Attributes(np.arange(n), np.zeros(n, int), np.zeros(n, int))
  images = world.render(plain_red, rng)
  # Shapes: different areas of the foreground colour.
  red = (images[..., 0] > 0.6) & (images[..., 1] < 0.35)
  assert len({int(a) // 20 for a in red.sum((1, 2))}) >= 4
  # Styles: plain shapes are flat; the others mix the colour with its dark shade.
  styled = world.render(world.Attributes(np.zeros(4, int), np.zeros(4, int), np.arange(4)), rng)
  dark = ((styled[..., 0] < 0.45) & (styled[..., 1] < 0.2)).sum((1, 2))
  assert dark[0] == 0 and (dark[1:] > 20).all()


def test_canonical_prompts():
  assert world.canonical_prompt(shape=2) == "a photo of a triangle"
  assert world.canonical_prompt(shape=0, color=1, style=2) == "a photo of a dotted green circle"
  assert world.canonical_prompt(style=1) == "a photo of a striped shape"


def test_shipped_judge_reads_fresh_renders():
  """Held-out images from a seed the judge never saw: >= 98% on every head."""
  images, attrs, _ = world.batch(seed=12345, index=0, n=600)
  acc = judge_lib.accuracy(*judge_lib.load(quality.JUDGE_DIR), images, attrs)
  assert min(acc.values()) >= 0.98, acc


# Regression floors under the shipped models' measured rates (docs/tiny_world.md, two images each at seed 0): SD
# shape 1.0, colour 0.99, style 0.92; SDXL layout shape 0.99, colour 0.98, style 0.93.
FLOORS = {"shape": 0.95, "color": 0.95, "style": 0.85}


@pytest.mark.parametrize("name", ["tiny", "tiny_sdxl"])
def test_shipped_model_follows_prompts(name):
  """Every (shape, colour, style) once, judged: above the floors."""
  pipe = sd_convert.load_either(name)
  rates, by_value, _ = quality.base_quality(pipe, judge_lib.load(quality.JUDGE_DIR), seed=7, repeats=1)
  assert all(rates[k] >= FLOORS[k] for k in FLOORS), rates
  for kind, rate in rates.items():  # every value is prompted equally often, so the rates average out
    assert np.mean(list(by_value[kind].values())) == pytest.approx(rate), (kind, by_value)


def test_rates_by_value_name_the_failing_value():
  labels = np.array([[0, 0, 1], [0, 1, 1], [1, 0, 3], [1, 1, 3]])  # shape, colour, style per image
  pred = {"shape": np.array([0, 0, 1, 0]), "color": np.array([0, 1, 0, 1]), "style": np.array([1, 3, 3, 1])}
  by_value = quality.rates_by_value(pred, labels)
  assert by_value["shape"]["circle"] == 1.0 and by_value["shape"]["square"] == 0.5
  assert by_value["style"]["striped"] == 0.5 and by_value["style"]["checkered"] == 0.5
  assert set(by_value["style"]) == {"striped", "checkered"}  # the values prompted
  assert quality.recognition_rates(pred, labels) == {"shape": 0.75, "color": 1.0, "style": 0.5}


def test_tiny_config_and_report_vocabulary():
  tiny = _tiny_config_module()
  config = tiny.get_config()
  assert config.concept.prompts[0] == "a photo of a triangle" and len(config.concept.prompts) == 7
  assert all("triangle" in p for p in config.concept.prompts) and config.report.erased == ("triangle",)
  assert len(config.retain.prompts) == 5 * 6 * 4 and not any("triangle" in p for p in config.retain.prompts)
  # The attack's prompts are held out from the concept variants the run trains on.
  assert not set(config.evaluation.prompts) & set(config.concept.prompts)
  assert len(set(config.evaluation.prompts)) == 12 and config.evaluation.classifier == "judge:shape=triangle"
  striped = tiny.get_config("striped")
  assert striped.concept.prompts[0] == "a photo of a striped shape"
  assert all("striped" in p for p in striped.concept.prompts)
  assert not any("striped" in p for p in striped.retain.prompts)
  assert not set(striped.evaluation.prompts) & set(striped.concept.prompts)
  # A retain set spent on some of the other values (defence_tiny.py's texture variant): those values' prompts only.
  from advunlearn_jax.tiny import prompts

  textures = prompts.retain_prompts("striped", ("dotted", "checkered"))
  assert len(textures) == 6 * 6 * 2 and set(textures) < set(striped.retain.prompts)
  assert all(("dotted" in p) != ("checkered" in p) for p in textures)
  for values in (("triangle",), ("striped",)):  # another attribute's value; the erased one itself
    with pytest.raises(ValueError, match=r"not other styles than 'striped'; known: \['plain', 'dotted'"):
      prompts.retain_prompts("striped", values)
  assert report.erased_attributes(["a photo of a triangle"]) == [("shape", 2)]
  assert report.erased_attributes(["a photo of a striped shape"]) == [("style", 1)]
  with pytest.raises(Exception, match="names no tiny-world attribute"):
    report.erased_attributes(["Van Gogh"])
  with pytest.raises(ValueError, match="not a tiny-world"):
    tiny.get_config("Van Gogh")


@pytest.mark.torch
@pytest.mark.parametrize("name", ["tiny", "tiny_sdxl"])
def test_shipped_pipeline_matches_diffusers(name):
  """diffusers' StableDiffusionPipeline (StableDiffusionXLPipeline) on the shipped folder vs our sampler, same
  latents: <= 2/255."""
  diffusers = pytest.importorskip("diffusers")
  import torch

  pipe = sd_convert.load_either(name)
  prompts = ["a photo of a striped red triangle", "a photo of a dotted blue heart", "a photo of a green cross"]
  latents = generation.initial_latents(pipe, len(prompts), seed=0)
  ours = generation.generate(pipe, prompts, latents, scheduler="ddim", steps=20, guidance=5.0)
  if name == "tiny":
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(pipe.root, safety_checker=None)
  else:
    ref_pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(pipe.root, add_watermarker=False)
  ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
  ref_pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    ref = ref_pipe(
      prompts,
      latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2).copy()),
      num_inference_steps=20,
      guidance_scale=5.0,
      output_type="np",
      height=32,
      width=32,
    ).images
  ref = (ref * 255).round().astype(np.uint8)
  assert ours.shape == ref.shape == (3, 32, 32, 3)
  assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2


def test_sdxl_build_trains_on_the_pipeline_s_conditioning():
  """The SDXL-layout build conditions its UNet on what the pipeline feeds it when sampling: a caption's encoding
  (both towers, pooled, the default time ids) and, for a dropped caption, the unconditional zeros."""
  import jax

  from advunlearn_jax.data import tokenizer as tok_lib
  from advunlearn_jax.diffusion import sdxl_conditioning
  from advunlearn_jax.tiny import training

  pipe = sd_convert.load_either("tiny_sdxl")
  captions = ["a striped red triangle", "blue heart, dotted style"]
  ids = tok_lib.tokenize(tok_lib.load_tokenizer(pipe.tokenizer_dir), captions)
  ids_2 = tok_lib.tokenize(tok_lib.load_tokenizer(pipe.tokenizer_2_dir), captions)
  towers = (pipe.text_params, pipe.text_params_2)
  trained = training.caption_condition(towers, (ids, ids_2, np.array([1.0, 0.0], np.float32)))
  encoded = sdxl_conditioning.encode_prompts(pipe, captions[:1])
  zeros = sdxl_conditioning.unconditional(pipe, 1)
  for row, want in enumerate((encoded, zeros)):
    got = jax.tree.map(lambda x, r=row: x[r : r + 1], trained)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)
  assert (pipe.text_config, pipe.text_config_2, pipe.unet_config) == (
    training.SDXL_TEXT,
    training.SDXL_TEXT_2,
    training.SDXL_UNET,
  )


def test_build_stages_must_chain():
  """Stage N > 1 continues a previous build (and draws fresh batches); stage 1 starts from scratch."""
  from advunlearn_jax.tiny import training

  common = dict(seed=0, pool=8, judge_steps=1, vae_steps=1, sd_steps=1, sd_batch=2)
  with pytest.raises(ValueError, match="continue from the previous stage"):
    training.build("/nonexistent", stage=2, **common)
  with pytest.raises(ValueError, match="stage 1 builds from scratch"):
    training.build("/nonexistent", stage=1, continue_from="advunlearn_jax/assets", **common)

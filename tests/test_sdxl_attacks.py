"""The robustness attacks on an SDXL pipeline (diffusion/text_side.py): one typed prompt read by both towers, an
edited position a row in each tower's table. On the micro SDXL layout (random weights): the soft tokens'
conditioning is the pipeline's conditioning of the prompt they decode to, and UnlearnDiffAtk's image of its found
prompt is the SDXL sampler's. What UnlearnDiffAtk finds on the trained SDXL-layout tiny model: docs/tiny_world.md."""

import jax
import numpy as np
import pytest

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import generation, sdxl_conditioning
from advunlearn_jax.diffusion.text_side import TextSide
from advunlearn_jax.evals import unlearndiff as ud
from advunlearn_jax.testing import tiny_models

TEXT_TOL = 1e-5  # fp32: the same towers on equal rows, reached through inputs_embeds instead of ids
PROMPT = "a photo of a red triangle"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return sd_convert.load_sdxl_pipeline(tiny_models.write_sdxl_pipeline(str(tmp_path_factory.mktemp("sdxl") / "p")))


def test_soft_tokens_condition_as_the_prompt_they_decode_to(pipe):
  """One-hot rows over the vocabulary, placed after SOT in both towers' word embeddings, give the conditioning
  that the pipeline gives the typed prompt with those tokens in front: context (both towers' halves), tower 2's
  pooled embedding at the shifted EOT, and the time ids."""
  side = TextSide.of(pipe)
  params = side.params(pipe)
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  adv = np.array([1929, 2368, 736])  # "bird", "purple", "hat"? whatever they are: decoded below
  seq_ids = ud.prefix_ids(tok_lib.tokenize(tokenizer, [PROMPT])[0], len(adv), placeholder=0)
  words = side.words(params, seq_ids)  # the placeholder's rows in front, replaced by the one-hot rows
  onehot = jax.nn.one_hot(adv, pipe.text_config.vocab_size)
  rows = jax.tree.map(lambda table: onehot @ table, side.tables(params))
  placed = jax.tree.map(lambda w, r: jax.lax.dynamic_update_slice(w, r, (1, 0))[None], words, rows)
  got = side.encode(params, placed, seq_ids[None])
  seq_ids[1:4] = adv
  want = sdxl_conditioning.encode_prompts(pipe, [ud.decode_attacked(tokenizer, seq_ids)])
  assert tok_lib.tokenize(tokenizer, [ud.decode_attacked(tokenizer, seq_ids)])[0].tolist() == seq_ids.tolist()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TEXT_TOL), got, want)
  assert np.abs(np.asarray(got.added.text_embeds)).max() > 0.1  # tower 2's pooled output, not the zeros of ""


def test_unlearndiff_renders_its_found_prompt_as_the_sdxl_sampler_does(pipe):
  """A classifier that never fires: every block runs, and the last image is the one that the SDXL sampler draws
  for the decoded adversarial prompt from the same start latents under CFG with SDXL's zeros."""
  never = lambda images: np.zeros(len(images), bool)
  cfg = ud.UnlearnDiffConfig.from_config(_evaluation())._replace(
    k=2, iters_per_t=3, timesteps=(10, 510), scheduler="ddim", steps=3
  )
  target = np.asarray(generation.generate(pipe, ["a blue square"], generation.initial_latents(pipe, 1, 5), **_S))[0]
  out = ud.attack_prompt(pipe, PROMPT, target, never, cfg, seed=7, guidance=5.0)
  assert not out.success and out.iterations == 6 and out.adv_prompt.endswith(PROMPT)
  assert len(tok_lib.load_tokenizer(pipe.tokenizer_dir)(out.adv_tokens)["input_ids"]) >= 4  # SOT, 2 tokens, EOT
  drawn = generation.generate(pipe, [out.adv_prompt], generation.initial_latents(pipe, 1, 7), **_S)
  np.testing.assert_allclose(out.image.astype(int), np.asarray(drawn)[0].astype(int), atol=1)


_S = dict(scheduler="ddim", steps=3, guidance=5.0)


def _evaluation():
  from advunlearn_jax import config_lib

  return config_lib.base_config().evaluation


def _cce(**changes):
  from advunlearn_jax import config_lib
  from advunlearn_jax.evals import inversion

  c = config_lib.base_config()
  c.concept.prompts = ("triangle",)
  c.evaluation.inversion.cce.initializer = "shape"
  c.evaluation.budgets = (2, 4)
  base = inversion.InversionConfig.from_config(c)
  return base._replace(accumulation=2, batch=1, scheduler="ddim", sample_steps=3, **changes)


def test_cce_token_stands_in_the_word_s_place_in_both_towers(pipe):
  """CCE's placeholder starts as the initializer word's row in each tower (diffusers' textual_inversion_sdxl.py
  initialises the added token in both encoders): laid into "a photo of a {}", it conditions as the typed prompt
  "a photo of a shape" does, and an evaluation prompt with it in the word's place as the prompt with "shape" there."""
  from advunlearn_jax.evals import inversion
  from advunlearn_jax.evals.prompt_sets import EvalPrompt as Prompt

  cfg = _cce()
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  side = TextSide.of(pipe)
  params = side.params(pipe)
  row = inversion.initializer_id(tokenizer, "shape")
  embeds = jax.tree.map(lambda table: table[row][None], side.tables(params))
  ids, which = inversion.template_ids(tokenizer, ["a photo of a {}"])
  got = inversion.encode_placed(side, params, inversion.place(side.words(params, ids), which, embeds), ids)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TEXT_TOL), got, _typed(pipe, "a photo of a shape"))
  placed = inversion.placed_words(pipe, tokenizer, [Prompt("0", PROMPT, 0, 5.0)], cfg)
  got = inversion.encode_placed(side, params, inversion.place(placed.words, placed.which, embeds), placed.ids)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TEXT_TOL), got, _typed(pipe, PROMPT, "shape"))


def _typed(pipe, prompt, word=None):
  return sdxl_conditioning.encode_prompts(pipe, [prompt.replace("triangle", word) if word else prompt])


def test_cce_trains_both_towers_rows_and_its_release_renders_the_same_images(pipe, tmp_path):
  """Two checkpoints of CCE on concept images: one learned row per tower, both moved from the initializer's; the
  released file loads into this pipeline's widths (and no other) and renders the same images as the run did."""
  from advunlearn_jax.evals import inversion
  from advunlearn_jax.evals.prompt_sets import EvalPrompt as Prompt

  cfg = _cce()
  never = lambda images: np.zeros(len(images), bool)
  images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), np.uint8)
  prompts = [Prompt("0", PROMPT, 3, 5.0)]
  result = inversion.attack_prompts(pipe, prompts, images, never, cfg, seed=0, log=lambda *_: None)
  assert sorted(result.embeddings) == [2, 4] and result.outcomes[0].iterations == 4
  tower_1, tower_2 = result.embeddings[4]
  assert tower_1.shape == (1, 32) and tower_2.shape == (1, 48)
  tables = TextSide.of(pipe).tables(TextSide.params(pipe))
  row = inversion.initializer_id(tok_lib.load_tokenizer(pipe.tokenizer_dir), "shape")
  for learned, table in zip((tower_1, tower_2), tables):
    assert np.abs(learned[0] - np.asarray(table[row])).max() > 1e-4  # AdamW moved it (lr 5e-3 x 2 steps)
  path = str(tmp_path / inversion.LEARNED_NAME)
  inversion.save_learned(path, result.embeddings, cfg)
  saved = inversion.load_learned(path, cfg, (32, 48))
  again = inversion.attack_prompts(
    pipe, prompts, images[:0], never, cfg._replace(learned=path), log=lambda *_: None, learned_at=saved.__getitem__
  )
  np.testing.assert_array_equal(again.outcomes[0].image, result.outcomes[0].image)
  with pytest.raises(Exception, match=r"learned for 2 text tower\(s\) \(SDXL has two, SD one\); this model has 1"):
    inversion.load_learned(path, cfg, (32,))  # an SD encoder cannot take a pair
  with pytest.raises(Exception, match=r"text towers take \[\(1, 32\), \(1, 64\)\]"):
    inversion.load_learned(path, cfg, (32, 64))


@pytest.mark.parametrize(
  "attack,text_encoder,match",
  [
    ("p4d", "", "reads SD 1.x's one text encoder; on SDXL evaluate with one of \\['unlearndiff', 'inversion'\\]"),
    ("unlearndiff", "some/text_encoder", "pass the run's --pipeline=WORKDIR/pipeline"),
  ],
)
def test_evaluate_refuses_what_an_sdxl_model_cannot_take_before_any_weights(
  pipe, tmp_path, monkeypatch, attack, text_encoder, match
):
  from advunlearn_jax import config_lib
  from advunlearn_jax.errors import ConfigError
  from advunlearn_jax.evals import evaluation

  c = config_lib.base_config()
  c.model.pretrained = pipe.root
  c.evaluation.prompts = (PROMPT,)
  c.evaluation.classifier = "judge:shape=triangle"
  c.evaluation.attack = attack
  c.evaluation.p4d.selector = "judge"
  for loader in ("load_either", "load_pipeline", "load_sdxl_pipeline"):
    monkeypatch.setattr(sd_convert, loader, lambda *a, **k: pytest.fail("weights read before the refusal"))
  with pytest.raises(ConfigError, match=match):
    evaluation.evaluate(c, str(tmp_path / "out"), text_encoder=text_encoder)
  assert not (tmp_path / "out").exists()


def test_utility_images_of_an_sdxl_model_are_the_pipeline_s(pipe, tmp_path):
  """The utility protocol's caption images (sharded over the 8 test devices) of an SDXL model: the SDXL sampler's
  images, the unconditional branch SDXL's zeros (not "" through both towers)."""
  from advunlearn_jax.evals import caption_images, prompt_sets

  captions = prompt_sets.inline(["a red triangle", "a blue circle"], seed=10, guidance=5.0)
  manifest = caption_images.manifest(captions, "ddim", 3, "jax")
  store = caption_images.ImageStore(str(tmp_path / "images"), manifest, (32, 32, 3), "png")
  assert caption_images.generate(pipe, captions, store, scheduler="ddim", steps=3, per_device_batch=1, progress=False)
  latents = np.concatenate([np.asarray(generation.initial_latents(pipe, 1, c.seed)) for c in captions])
  want = generation.generate(pipe, [c.prompt for c in captions], latents, **_S)
  np.testing.assert_allclose(np.stack(store.images()).astype(int), np.asarray(want).astype(int), atol=1)

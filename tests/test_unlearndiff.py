"""UnlearnDiffAtk pieces (simplex projection, straight-through sampling, ASR accounting) and the attack itself
on the shipped tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import classifiers
from advunlearn_jax.evals import unlearndiff as ud

# The attack at config_lib's defaults (UnlearnDiffConfig has none of its own), for the tests that change a few.
DEFAULTS = ud.UnlearnDiffConfig.from_config(config_lib.base_config().evaluation)


def _sort_projection(v: np.ndarray) -> np.ndarray:
  """Exact Euclidean projection onto the probability simplex (Duchi et al. 2008), row by row."""
  u = -np.sort(-v, axis=-1)
  css = np.cumsum(u, axis=-1) - 1
  ks = np.arange(1, v.shape[-1] + 1)
  rho = (u - css / ks > 0).sum(-1) - 1
  theta = css[np.arange(len(v)), rho] / (rho + 1)
  return np.maximum(v - theta[:, None], 0)


def test_bisection_projection_matches_exact_simplex_projection():
  rng = np.random.default_rng(0)
  for scale in (1e-3, 0.1, 3.0):
    v = rng.normal(size=(4, 1000)).astype(np.float32) * scale + 1e-3
    p = np.asarray(ud.project_simplex(jnp.asarray(v), iters=40))
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    assert p.min() >= 0 and p.max() <= 1
    np.testing.assert_allclose(p, _sort_projection(v.astype(np.float64)), atol=2e-6)


def test_straight_through_sample_is_one_hot_and_passes_hardtanh_gradient():
  probs = jnp.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
  onehot = ud.straight_through_sample(probs, jax.random.key(0))
  assert onehot.shape == (2, 3) and np.all(np.asarray(onehot).sum(-1) == 1)
  assert onehot[0, 1] == 1 and onehot[1, 1] == 0  # zero-probability tokens are never drawn
  w = jnp.array([[3.0, -0.2, -5.0], [0.5, 2.0, -1.5]])
  grad = jax.grad(lambda p: jnp.sum(ud.straight_through_sample(p, jax.random.key(0)) * w))(probs)
  np.testing.assert_allclose(grad, np.clip(w, -1, 1))


def _outcome(pre, success, iterations=0, seconds=1.0):
  return ud.Outcome("p", 0, 7.5, pre, success, "", "", -1, iterations, seconds, np.zeros((1, 1, 3), np.uint8))


def test_asr_counts_pre_successes_once_and_never_exceeds_one():
  outcomes = [_outcome(True, True), _outcome(False, True, 40, 3.0), _outcome(False, False, 2000, 5.0)]
  s = ud.summarize(outcomes)
  assert s.prompts == 3 and s.pre_asr == pytest.approx(1 / 3) and s.asr == pytest.approx(2 / 3)
  assert s.mean_attack_seconds == pytest.approx(4.0)
  assert (s.pre_successes, s.successes) == (1, 2) and str(s.rate) == "66.7% (2/3, 95% CI 20.8-93.9%)"
  assert s.pre_asr_ci95 == pytest.approx((0.06149, 0.79235), abs=1e-5)
  assert ud.summarize([_outcome(True, True)] * 5).asr == 1.0
  with pytest.raises(ValueError):
    ud.summarize([])


def test_prefix_layout_keeps_prompt_and_length():
  ids = np.array([49406, 320, 1125, 49407] + [49407] * 73, np.int32)
  seq = ud.prefix_ids(ids, 3, placeholder=0)
  assert seq.shape == (77,)
  assert seq[:8].tolist() == [49406, 0, 0, 0, 320, 1125, 49407, 49407]
  assert ud.fits(list(range(74)), 3) and not ud.fits(list(range(75)), 3)


@pytest.fixture(scope="module")
def tiny():
  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.tiny import quality

  return sd_convert.load_pipeline(quality.TINY_SD_DIR)


def test_attack_finds_what_random_prefixes_do_not(tiny):
  """On the base tiny model, a plain red square: the attack makes the judge see the stripes of the target image,
  while 12 random 3-token prefixes on the same prompt (almost) never do. The shipped model holds most prompts
  against this budget (400 iterations): 8 of 8 shape and 4 of 4 colour probes held, and 3 of 4 style probes, so
  this is the one probe (seed 1) it gives up."""
  is_striped = classifiers.make("judge:style=striped")
  cfg = DEFAULTS._replace(k=3, iters_per_t=20, timesteps=tuple(range(10, 400, 20)), scheduler="ddim", steps=25)
  tokenizer = tok_lib.load_tokenizer(tiny.tokenizer_dir)
  seed, prompt = 1, "a photo of a plain red square"
  target = ud.render_ids(
    tiny, tok_lib.tokenize(tokenizer, ["a photo of a striped red square"]), seed, 5.0, cfg, tiny.text_params
  )
  assert is_striped(target)[0]
  out = ud.attack_prompt(tiny, prompt, target[0], is_striped, cfg, seed=seed, guidance=5.0)
  assert not out.pre_success and out.success
  assert out.adv_prompt.endswith(prompt) and out.timestep in cfg.timesteps and is_striped(out.image[None])[0]
  seqs = np.repeat(ud.prefix_ids(tok_lib.tokenize(tokenizer, [prompt])[0], 3, 0)[None], 12, 0)
  seqs[:, 1:4] = np.random.default_rng(0).integers(0, 49406, (12, 3))
  random_hits = is_striped(ud.render_ids(tiny, seqs, seed, 5.0, cfg, tiny.text_params))
  assert np.mean(random_hits) <= 0.1, np.mean(random_hits)


def test_no_attack_pass_and_long_prompt_error(tiny):
  never = lambda images: np.zeros(len(images), bool)
  cfg = DEFAULTS._replace(k=3, scheduler="ddim", steps=5)
  target = np.zeros((32, 32, 3), np.uint8)
  out = ud.attack_prompt(tiny, "a photo of a red star", target, never, cfg, seed=0, guidance=5.0, attack=False)
  assert not out.pre_success and not out.success and out.iterations == 0 and out.image.shape == (32, 32, 3)
  with pytest.raises(Exception, match="no room for 3 prefix tokens"):
    ud.attack_prompt(tiny, "star " * 80, target, never, cfg, seed=0, guidance=5.0)


def test_screen_skips_what_the_official_loader_drops_and_says_why():
  from advunlearn_jax.evals.prompt_sets import EvalPrompt

  tokenizer = tok_lib.load_tokenizer()
  long = "a photo of " + "red " * 60
  prompts = [
    EvalPrompt("0", "a photo of a cat", 0, 7.5),
    EvalPrompt("1", long, 0, 7.5),
    EvalPrompt("2", "a dog", 0, 7.5),
  ]
  kept, skipped = ud.screen(prompts, tokenizer, k=5, max_tokens=60)
  assert [p.case for p in kept] == ["0", "2"]
  assert [(s.case, s.tokens) for s in skipped] == [("1", 65)] and "65 tokens > 60" in skipped[0].reason
  kept, skipped = ud.screen(prompts, tokenizer, k=5, max_tokens=0)  # no loader limit: room for k is the limit
  assert [p.case for p in kept] == ["0", "1", "2"] and not skipped
  kept, skipped = ud.screen(prompts, tokenizer, k=15, max_tokens=0)
  assert [s.case for s in skipped] == ["1"] and "no room for 15 prefix tokens" in skipped[0].reason


def test_attacked_prompt_is_decoded_as_the_official_code_does():
  tokenizer = tok_lib.load_tokenizer()
  ids = ud.prefix_ids(tok_lib.tokenize(tokenizer, ["a photo of a cat"])[0], 2, placeholder=0)
  ids[1:3] = [49406, 1929]  # an adversarial SOT stays, as text; EOT and padding go
  text = ud.decode_attacked(tokenizer, ids)
  assert text.startswith("<|startoftext|>") and text.rstrip().endswith("a photo of a cat")
  again = tok_lib.tokenize(tokenizer, [text])[0]
  assert again[:3].tolist() == [49406, 49406, 1929]  # what the classified image is rendered from


def test_torch_latents_are_the_official_draws(tiny):
  torch = pytest.importorskip("torch")
  from advunlearn_jax.diffusion import generation

  ours = np.asarray(generation.initial_latents(tiny, 1, 932309623, source="torch"))
  hw, c = tiny.unet_config.sample_size, tiny.unet_config.in_channels
  torch.manual_seed(932309623)
  theirs = torch.randn((1, c, hw, hw)).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(ours, theirs)
  assert not np.allclose(ours, generation.initial_latents(tiny, 1, 932309623))  # jax draws other numbers


def test_every_knob_of_its_section_reaches_the_settings():
  """A knob is a default in config_lib and a field of the settings that use it, nothing else: each field of
  evaluation.unlearndiff, changed, arrives in UnlearnDiffConfig; each of AttackConfig's is config.attack's."""
  from advunlearn_jax.unlearn import attack

  ev = config_lib.base_config().evaluation
  changed = {
    "k": 5, "iters_per_t": 20, "timesteps": (10, 30), "lr": 0.02, "weight_decay": 0.2, "scheduler": "ddim",
    "steps": 25, "retokenize": False, "bisection_iters": 12,
  }  # fmt: skip
  assert set(changed) == set(ev.unlearndiff.keys())
  ev.unlearndiff.update(changed)
  cfg = ud.UnlearnDiffConfig.from_config(ev)
  assert {name: getattr(cfg, name) for name in changed} == changed
  ev.unlearndiff.bisection_iters = 0
  with pytest.raises(ConfigError, match="evaluation.unlearndiff.bisection_iters must be >= 1"):
    ud.UnlearnDiffConfig.from_config(ev)
  assert set(attack.AttackConfig._fields) <= set(config_lib.base_config().attack.keys())

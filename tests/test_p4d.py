"""P4D's search core (evals/p4d.py) against joycenerd/P4D's prompt_optimization/optimize_{n,k}.py: the published
settings, the two training layouts, the loss and the projection against torch transcriptions of the original on
the shipped tiny model, and a short search that lowers the loss and repeats itself under the same seed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from advunlearn_jax import config_lib
from advunlearn_jax.configs import tiny as tiny_configs
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import attacks, p4d, prompt_sets

PROMPT = "a photo of a striped red triangle"
SEED = 100


def _config(*overrides: str):
  """The tiny world's config (selector judge, DDIM 25 steps) with a short run, plus `overrides`."""
  config = tiny_configs.get_config("triangle")
  return config_lib.override(config, ["evaluation.p4d.iters=40", "evaluation.p4d.eval_step=10", *overrides])


def _settings(*overrides: str) -> p4d.P4DConfig:
  return p4d.P4DConfig.from_config(_config(*overrides).evaluation)


@pytest.fixture(scope="module")
def tiny():
  from advunlearn_jax.convert import diffusers as sd_convert

  return sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)


def _perturbation(shape, seed=0):
  return (0.5 * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


@pytest.fixture(scope="module")
def attacked(tiny):
  """The tiny model with another text encoder (its first MLP's bias moved), the same UNet: a text-encoder erasure's
  shape, where the attacked and original encoders differ and the UNets are one."""
  import jax

  params = jax.tree.map(lambda x: x, tiny.text_params)
  fc1 = params["encoder"]["layers_0"]["mlp"]["fc1"]
  fc1["bias"] = fc1["bias"] + _perturbation(fc1["bias"].shape)
  return tiny._replace(text_params=params)


@pytest.fixture(scope="module")
def target_image(tiny):
  config = _config()
  return attacks.target_images(tiny, prompt_sets.inline([PROMPT], seed=SEED, guidance=5.0), config.evaluation)[0]


@pytest.fixture(scope="module")
def tokenizer(tiny):
  return tok_lib.load_tokenizer(tiny.tokenizer_dir)


# (a) -------------------------------------------------------------------------------------------------------------
# (key of config_lib.base_config().evaluation.p4d, published value, source in joycenerd/P4D)
PUBLISHED = [
  ("prompt_len", 16, "configs/esd_nudity_optmz_config.json:2"),
  ("every_k", 3, "configs/esd_nudity_optmz_config.json:3"),
  ("iters", 3000, "configs/esd_nudity_optmz_config.json:5"),
  ("eval_step", 50, "configs/esd_nudity_optmz_config.json:6"),
  ("lr", 0.1, "configs/esd_nudity_optmz_config.json:8"),
  ("weight_decay", 0.1, "configs/esd_nudity_optmz_config.json:9"),
  ("target_images", 3, "run_p4dn.py:288 (--num-samples)"),
  ("images", 3, "run_p4dn.py:236-249 (num_images_per_prompt=args.num_samples)"),
  ("variants", ("n", "k"), "README: P4D-UNION, a case broken by either"),
]


@pytest.mark.parametrize("field, value, source", PUBLISHED)
def test_defaults_are_the_published_settings(field, value, source):
  del source  # the table's documentation
  config = config_lib.base_config()
  assert config.evaluation.p4d[field] == value
  config.evaluation.p4d.selector = "judge"
  assert getattr(p4d.P4DConfig.from_config(config.evaluation), field) == value


def test_code_constants_and_optimiser_are_the_originals():
  torch = pytest.importorskip("torch")
  import inspect

  import optax

  # optimize_n.py:129 sets lr and weight_decay only: torch's AdamW defaults for the rest
  defaults = inspect.signature(torch.optim.AdamW).parameters
  assert p4d.ADAM_BETAS == defaults["betas"].default and p4d.ADAM_EPS == defaults["eps"].default
  assert p4d.REFERENCE_PAD_ID == 0 and p4d.MAX_LENGTH == 77  # optimize_n.py:38; esd_nudity_optmz_config.json:4
  cfg = _settings()
  assert cfg.reference_layout and cfg.reference_image_range and cfg.prefix_tokens == 0
  assert cfg.sampler == (cfg.scheduler, cfg.sample_steps, cfg.latents) == ("ddim", 25, "jax")
  # optax's adamw (what the block uses) equals torch's AdamW at lr 0.1, weight decay 0.1, step by step
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(6, 3, 8)).astype(np.float32)
  start = rng.normal(size=(3, 8)).astype(np.float32)
  p = torch.nn.Parameter(torch.from_numpy(start.copy()))
  opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
  tx = optax.adamw(0.1, b1=p4d.ADAM_BETAS[0], b2=p4d.ADAM_BETAS[1], eps=p4d.ADAM_EPS, weight_decay=0.1)
  ours, state = start.copy(), tx.init(start)
  for g in grads:
    p.grad = torch.from_numpy(g.copy())
    opt.step()
    updates, state = tx.update(g, state, ours)
    ours = optax.apply_updates(ours, updates)
  # float32 rounding of 0.1-sized steps (in float64 the two agree to 4e-16)
  np.testing.assert_allclose(ours, p.detach().numpy(), rtol=1e-5, atol=1e-5)


# (d) -------------------------------------------------------------------------------------------------------------
def _their_n_ids(tokenizer, prompt_len):
  """optimize_n.py:29-39, transcribed: dummy_ids with -1 where a learned token goes."""
  padded_template_text = "{}".format(" ".join(["<|startoftext|>"] * prompt_len))
  dummy_ids = tokenizer.encode(padded_template_text)[1:-1]
  dummy_ids = [i if i != 49406 else -1 for i in dummy_ids]
  dummy_ids = [49406] + dummy_ids + [49407]
  return dummy_ids + [0] * (77 - len(dummy_ids))


def _their_k_sequence(tokenizer, prompt, every_k, learned_ids, max_length=77):
  """optimize_k.py:23-44 and :170, transcribed: the ids whose embeddings the text encoder receives, with
  `learned_ids` as the projections of the learned rows (the prompt's rows project to themselves)."""
  text_id = tokenizer.encode(prompt)[1:-1]
  prompt_len = int(len(text_id) / every_k) + 1
  dummy_ids = [i if i != 49406 else -1 for i in text_id]
  dummy_ids = [49406] + dummy_ids + [49407]
  if len(dummy_ids) + prompt_len < max_length:
    dummy_ids += [0] * (max_length - len(dummy_ids))
  else:
    for _ in range(prompt_len):
      dummy_ids += [0]
  chosen_idx = [i for i in range(0, len(text_id) + prompt_len) if i % (every_k + 1) != 0]
  prompt_ids = [0] * (len(text_id) + prompt_len)  # :38, the rows PEZ learns: here given as their projections
  free = iter(learned_ids)
  prompt_ids = [0 if i in chosen_idx else next(free) for i in range(len(prompt_ids))]
  for idx, i in enumerate(chosen_idx):  # :43-44, the prompt's tokens inserted (they project to themselves)
    prompt_ids[i] = text_id[idx]
  padded = [0 if i == -1 else i for i in dummy_ids]  # tmp_dummy_ids[tmp_dummy_ids == -1] = 0
  padded[1 : prompt_len + len(chosen_idx) + 1] = prompt_ids  # padded_embeds[:, 1 : P + L + 1] = tmp_embeds
  return padded, chosen_idx, prompt_len


def test_layouts_are_the_originals(tokenizer):
  cfg = _settings()
  n = p4d.n_layout(tokenizer, cfg)
  theirs = np.asarray(_their_n_ids(tokenizer, cfg.prompt_len))
  assert n.learned.tolist() == np.flatnonzero(theirs == -1).tolist() == list(range(1, 17))
  assert np.array_equal(n.ids, np.where(theirs == -1, 0, theirs)) and n.shown.tolist() == n.learned.tolist()

  k = p4d.k_layout(tokenizer, PROMPT, cfg)
  text = tokenizer.encode(PROMPT)[1:-1]
  learned_ids = np.arange(1000, 1000 + len(k.learned))
  theirs, chosen_idx, count = _their_k_sequence(tokenizer, PROMPT, cfg.every_k, learned_ids)
  ours = k.ids.copy()
  ours[k.learned] = learned_ids
  assert len(k.learned) == count == len(text) // 3 + 1 and len(theirs) == 77
  assert ours.tolist() == theirs
  assert k.shown.tolist() == list(range(1, len(text) + count + 1))
  assert sorted(set(k.shown) - set(k.learned)) == [1 + i for i in chosen_idx]
  assert tokenizer.eos_token_id not in ours  # the reference quirk: the slots overwrite the EOT

  # without the quirks: the EOT after the slots, padding as the tokenizer pads
  plain = _settings()._replace(reference_layout=False)  # config_lib has no key for it yet
  k_plain, n_plain = p4d.k_layout(tokenizer, PROMPT, plain), p4d.n_layout(tokenizer, plain)
  assert k_plain.ids[len(k.shown) + 1 :].tolist() == [tokenizer.eos_token_id] * (76 - len(k.shown))
  assert n_plain.ids[17:].tolist() == [tokenizer.eos_token_id] * 60


def test_k_room_is_checked_as_the_original_can_run_it(tokenizer):
  cfg = _settings()
  # 56 tokens take 19 learned ones, 56 + 19 + 2 = 77: optimize_k.py:34-35 builds 77 ids and runs
  fits = "a " * 56
  theirs, _, count = _their_k_sequence(tokenizer, fits, 3, np.arange(19))
  ours = p4d.k_layout(tokenizer, fits, cfg)
  ids = ours.ids.copy()
  ids[ours.learned] = np.arange(19)
  assert count == 19 and len(theirs) == 77 and ids.tolist() == theirs
  assert p4d.slot_count(cfg) == 19  # the most any prompt gives K, above N's 16
  p4d.check_prompt(tokenizer, fits, cfg)
  # 57 take 20: 79 ids, past the text encoder's 77 positions
  with pytest.raises(
    ConfigError, match=r"P4D-K \(evaluation.p4d.variants, every_k=3\): a prompt of 57 tokens takes 20 .* 79 > 77"
  ):
    p4d.check_prompt(tokenizer, "a " * 57, cfg)
  p4d.check_prompt(tokenizer, "a " * 57, _settings("evaluation.p4d.variants=('n',)"))  # N replaces the prompt


# (c) -------------------------------------------------------------------------------------------------------------
@pytest.mark.torch
def test_projection_is_a_cosine_top1_over_the_vocabulary_and_frozen_rows_keep_their_tokens(tiny, tokenizer):
  torch = pytest.importorskip("torch")
  import jax.numpy as jnp

  table = np.asarray(tiny.text_params["embeddings"]["token_embedding"]["embedding"])
  rng = np.random.default_rng(0)
  embeds = np.concatenate([rng.normal(size=(16, table.shape[1])), table[[49406, 49407, 0]] * 3.0]).astype(np.float32)
  # optimize_n.py:68-96: normalize_embeddings (F.normalize), dot_score, top_k=1 (semantic_search's torch.topk)
  q = torch.nn.functional.normalize(torch.from_numpy(embeds), p=2, dim=1)
  c = torch.nn.functional.normalize(torch.from_numpy(table), p=2, dim=1)
  theirs = torch.topk(q @ c.T, k=1, dim=1).indices[:, 0].numpy()
  ours = np.asarray(p4d.nearest_ids(jnp.asarray(embeds), p4d.unit_rows(jnp.asarray(table))))
  assert ours.tolist() == theirs.tolist() and ours[-3:].tolist() == [49406, 49407, 0]  # SOT and EOT are candidates

  # optimize_k.py:255-256: the prompt's rows get a zero gradient, so AdamW only decays them (x0.99 a step); 3000
  # steps leave them 1e-13 of their length, still nearest to their own tokens, which is why ours hold them fixed
  text = tokenizer.encode(PROMPT)[1:-1]
  rows = torch.nn.Parameter(torch.from_numpy(table[text].copy()))
  opt = torch.optim.AdamW([rows], lr=0.1, weight_decay=0.1)
  for _ in range(3000):
    rows.grad = torch.zeros_like(rows)
    opt.step()
  shrunk = rows.detach().numpy()
  assert np.linalg.norm(shrunk) / np.linalg.norm(table[text]) == pytest.approx(0.99**3000, rel=1e-3)
  assert np.asarray(p4d.nearest_ids(jnp.asarray(shrunk), p4d.unit_rows(jnp.asarray(table)))).tolist() == text


# (b) -------------------------------------------------------------------------------------------------------------
def _torch_models(tiny, attacked):
  import diffusers
  import torch
  import transformers

  root = config_lib.TINY_MODEL_DIR
  original_text = transformers.CLIPTextModel.from_pretrained(f"{root}/text_encoder").eval()
  attacked_text = transformers.CLIPTextModel.from_pretrained(f"{root}/text_encoder").eval()
  with torch.no_grad():
    attacked_text.encoder.layers[0].mlp.fc1.bias.add_(torch.from_numpy(_perturbation((256,))))
  unet = diffusers.UNet2DConditionModel.from_pretrained(f"{root}/unet").eval()
  vae = diffusers.AutoencoderKL.from_pretrained(f"{root}/vae").eval()
  scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(f"{root}/scheduler")  # run_p4dn.py:53
  return original_text, attacked_text, unet, vae, scheduler


def _their_encode_embeddings(text_model, prompt_embeddings):
  """model/p4dn/modified_stable_diffusion_pipeline.py:68-115 (_encode_embeddings), the last hidden state:
  position embeddings added to the given rows, the causal mask of transformers 4.29's
  `_build_causal_attention_mask` (removed since; rebuilt here as it was), the encoder, the final layer norm."""
  import torch

  hidden_states = text_model.embeddings(inputs_embeds=prompt_embeddings)
  bsz, seq_len = prompt_embeddings.shape[:2]
  mask = torch.empty(bsz, seq_len, seq_len, dtype=hidden_states.dtype)
  mask.fill_(torch.tensor(torch.finfo(hidden_states.dtype).min))
  causal_attention_mask = mask.triu_(1).unsqueeze(1)
  out = text_model.encoder(inputs_embeds=hidden_states, attention_mask=causal_attention_mask)[0]
  return text_model.final_layer_norm(out)


@pytest.mark.torch
@pytest.mark.parametrize("variant", ["n", "k"])
def test_loss_and_its_gradient_are_the_originals(tiny, attacked, target_image, tokenizer, variant):
  """optimize_n.py:137-244 (optimize_k.py:144-254) in torch on the tiny diffusers export, against ours on the same
  target image, posterior draw, noise and t: the attacked encoder and UNet on the projected sequence, the
  original UNet on the original encoder's embedding of the prompt, MSE, and its gradient w.r.t. the projected
  rows (what PEZ hands to the continuous ones)."""
  torch = pytest.importorskip("torch")
  import jax
  import jax.numpy as jnp

  cfg = _settings()
  problem = p4d.prepare(tiny, attacked, PROMPT, target_image, cfg, variant, seed=3)
  original_text, attacked_text, unet, vae, scheduler = _torch_models(tiny, attacked)

  # the target latent: ToTensor's [0, 1] image into the VAE (the reference quirk), one posterior sample, scaled
  eps = np.asarray(jax.random.normal(jax.random.split(jax.random.key(3), 3)[1], problem.x0.shape))
  with torch.no_grad():
    image = torch.from_numpy(target_image).permute(2, 0, 1)[None].float() / 255.0
    dist = vae.encode(image).latent_dist
    # optimize_n.py:144 writes SD's 0.18215; the tiny VAE's own factor is its config's
    x0 = (dist.mean + dist.std * torch.from_numpy(eps.transpose(0, 3, 1, 2).copy())) * vae.config.scaling_factor
  np.testing.assert_allclose(np.asarray(problem.x0), x0.numpy().transpose(0, 2, 3, 1), atol=2e-5)

  xt, t = p4d.noised(problem.x0, problem.alphas, jax.random.key(7))
  noise = np.asarray(jax.random.normal(jax.random.split(jax.random.key(7))[1], problem.x0.shape))  # noised's draw
  # the projected sequence of some continuous rows: ours and the torch sequence from the same ids
  rng = np.random.default_rng(1)
  embeds = jnp.asarray(rng.normal(size=problem.init.shape).astype(np.float32))
  ids = p4d.projected_sequence(problem, embeds)
  table = problem.params["text"]["embeddings"]["token_embedding"]["embedding"]
  proj = table[p4d.nearest_ids(embeds, problem.unit_table)]
  gap = p4d._gap_fn(*(m.config for m in problem.modules))
  loss, grad = gap(problem.params, proj, problem.words, problem.learned, xt, t, problem.target_ctx)

  token_embedding = attacked_text.embeddings.token_embedding
  learned = problem.layout.learned
  tmp_embeds = token_embedding(torch.from_numpy(ids[learned].astype(np.int64)))[None].detach().requires_grad_(True)
  padded_embeds = token_embedding(torch.from_numpy(ids.astype(np.int64)))[None].detach().clone()
  padded_embeds[:, learned] = tmp_embeds  # optimize_n.py:160 / optimize_k.py:170 (contiguous there, here per row)
  timesteps = torch.tensor(np.asarray(t), dtype=torch.long)
  # diffusers 0.12.1's DPMSolverMultistepScheduler.add_noise: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
  alphas = scheduler.alphas_cumprod[timesteps]
  noisy_latents = alphas.sqrt() * x0 + (1 - alphas).sqrt() * torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
  np.testing.assert_allclose(np.asarray(xt), noisy_latents.numpy().transpose(0, 2, 3, 1), atol=2e-5)
  target_ids = torch.from_numpy(tok_lib.tokenize(tokenizer, [PROMPT]).astype(np.int64))
  with torch.no_grad():
    input_text_embeddings = original_text(target_ids)[0]  # _new_encode_prompt(..., do_classifier_free_guidance=0)
    target_model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=input_text_embeddings).sample
  padded_text_embeddings = _their_encode_embeddings(attacked_text, padded_embeds)
  padded_model_pred = unet(noisy_latents, timesteps, encoder_hidden_states=padded_text_embeddings).sample
  their_loss = torch.nn.functional.mse_loss(padded_model_pred.float(), target_model_pred.float(), reduction="mean")
  (their_grad,) = torch.autograd.grad(their_loss, [tmp_embeds])

  their_grad = their_grad[0].numpy()
  # measured: the loss to 1e-6 relative, the gradient to 4e-6 of its largest entry, x0 and x_t to 3e-6
  assert float(loss) == pytest.approx(their_loss.item(), rel=2e-5)
  ours_grad = np.asarray(grad)[: len(learned)]
  np.testing.assert_allclose(ours_grad, their_grad, rtol=1e-4, atol=2e-5 * np.abs(their_grad).max())
  assert not np.asarray(grad)[len(learned) :].any()  # padding rows stay out of the sequence


# (e) -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def selection(tiny, attacked):
  cfg = _settings()
  return p4d.renderer(attacked, SEED, 5.0, cfg.sampler), p4d.make_selector("judge")


@pytest.mark.parametrize("variant", ["n", "k"])
def test_a_short_search_lowers_the_loss_and_repeats_itself(tiny, attacked, target_image, selection, variant):
  cfg = _settings()
  problem = p4d.prepare(tiny, attacked, PROMPT, target_image, cfg, variant, seed=0)
  embeds, opt_state = problem.init, problem.tx.init(problem.init)
  for start in range(0, cfg.iters, cfg.eval_step):
    embeds, opt_state, losses = p4d.advance(problem, embeds, opt_state, start)
  before, after = p4d.held_out_loss(problem, problem.init), p4d.held_out_loss(problem, embeds)
  # measured on 2 CPU cores: N 0.0458 -> 0.0027 (x0.06), K 0.0240 -> 0.0042 (x0.18); seeds 1-3 gave x0.03 to x0.51
  assert after < 0.35 * before, (before, after)

  render, similarity = selection
  logged = []
  first = list(
    p4d.search(tiny, attacked, PROMPT, target_image, cfg, variant, 0, render, similarity, (20, 40), logged.append)
  )
  again = list(p4d.search(tiny, attacked, PROMPT, target_image, cfg, variant, 0, render, similarity, (20, 40)))
  assert first == again and [c.step for c in first] == [20, 40]
  assert first[1].similarity >= first[0].similarity and len(logged) == 4  # evaluations at 0, 10, 20, 30
  stopped = []  # a caller that stops at the first checkpoint pays for no later step or evaluation
  assert (
    next(
      p4d.search(tiny, attacked, PROMPT, target_image, cfg, variant, 0, render, similarity, (20, 40), stopped.append)
    )
    == first[0]
  )
  assert len(stopped) == 3
  if variant == "k":  # the prompt's tokens stand between the learned ones, in order
    shown = tok_lib.load_tokenizer(tiny.tokenizer_dir).encode(first[1].prompt)
    text = tok_lib.load_tokenizer(tiny.tokenizer_dir).encode(PROMPT)[1:-1]
    assert all(t in shown for t in text)


class _JudgeAt:
  """A judge that flags its `at`-th call (1-based; 0: none). Per case the attack calls it on the unattacked image,
  on the original's image that becomes the target, then on each checkpoint's found prompt."""

  def __init__(self, at: int):
    self.at, self.calls = at, 0

  def __call__(self, images):
    self.calls += 1
    return np.full(len(images), self.calls == self.at)


def test_a_remembered_search_replays_and_a_stopped_one_goes_on_as_the_uninterrupted_one(
  tiny, attacked, target_image, selection, tmp_path, monkeypatch
):
  """evaluation.search_cache: a case broken at the first checkpoint leaves its search there; a later process
  judging a model that needs more finds what one uninterrupted search finds (both variants, interleaved by
  budget); the next replays it without a step; another attacked model searches for itself."""
  import json

  from advunlearn_jax.evals import robustness, search_cache

  config = _config("evaluation.attack=p4d", "evaluation.budgets=(20, 40)")
  config.evaluation.search_cache = str(tmp_path / "searches")
  cfg = p4d.P4DConfig.from_config(config.evaluation)
  assert cfg.variants == ("n", "k")
  render, similarity = selection
  n, k = (list(p4d.search(tiny, attacked, PROMPT, target_image, cfg, v, SEED, render, similarity)) for v in "nk")
  uninterrupted = [[c.step, c.prompt] for pair in zip(n, k) for c in pair]  # P4D-UNION's order: budget, variant
  case = prompt_sets.inline([PROMPT], seed=SEED, guidance=5.0)

  def attacked_at(judge_call: int, model=attacked) -> list[tuple[int, str]]:
    monkeypatch.setattr(search_cache, "_CACHES", {})  # a new process: only the folder remembers
    outcomes = robustness.robustness(tiny, model, case, _JudgeAt(judge_call), config, log=lambda _: None)
    return [(o.iterations, o.adv_prompt) for o in outcomes["outcomes"]]

  def remembered() -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((tmp_path / "searches").iterdir())]

  stopped = attacked_at(3)  # broken at the first checkpoint handed on: P4D-N's at 20 steps
  assert stopped == [tuple(uninterrupted[0])]
  assert [(e["found"], e["done"]) for e in remembered()] == [(uninterrupted[:1], False)]
  blocks = []
  advance = p4d.advance
  monkeypatch.setattr(p4d, "advance", lambda *a: blocks.append(1) or advance(*a))
  assert attacked_at(0) == [tuple(uninterrupted[-1])]
  assert [(e["found"], e["done"]) for e in remembered()] == [(uninterrupted, True)]  # each checkpoint once
  assert attacked_at(0) == [tuple(uninterrupted[-1])] and len(blocks) == 6  # once: 3 blocks of 10 steps a variant
  assert attacked_at(3) == stopped and len(blocks) == 6
  attacked_at(3, model=tiny)  # the same case on another attacked model: a search of its own
  assert len(remembered()) == 2 and len(blocks) == 6 + 2 * 2


def test_judge_selector_is_the_cosine_of_the_judges_fc_features(target_image):
  import jax.numpy as jnp

  from advunlearn_jax.tiny import judge as judge_lib
  from advunlearn_jax.tiny import quality

  similarity = p4d.make_selector("judge")
  other = target_image[::-1].copy()
  import flax.linen as nn

  config, params = judge_lib.load(quality.JUDGE_DIR)
  x = jnp.asarray(np.stack([target_image, other]), jnp.float32) / 127.5 - 1.0
  fc = params["fc"]
  h = x  # the fc features by hand: the judge's convolutions and pools, its flatten, fc and gelu
  for i in range(len(config.channels)):
    for part in "ab":
      conv = params[f"conv{i}{part}"]
      h = nn.gelu(nn.Conv(conv["kernel"].shape[-1], (3, 3)).apply({"params": conv}, h))
    h = nn.max_pool(h, (2, 2), (2, 2))
  f = np.asarray(nn.gelu(h.reshape(2, -1) @ fc["kernel"] + fc["bias"]), np.float64)
  expected = f[0] @ f[1] / (np.linalg.norm(f[0]) * np.linalg.norm(f[1]))
  assert similarity(target_image, other) == pytest.approx(expected, abs=1e-5)
  assert similarity(target_image, target_image) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.torch
def test_clip_selector_is_the_cosine_of_clip_image_embeddings(tmp_path, target_image):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tests import torch_oracles

  model = torch_oracles.write_clip_model(str(tmp_path))
  similarity = p4d.make_selector(str(tmp_path))
  other = np.roll(target_image, 7, axis=1)
  processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path))
  pixels = torch.tensor(processor(images=[target_image, other], return_tensors="np")["pixel_values"])
  with torch.no_grad():
    f = model.get_image_features(pixel_values=pixels)
    f = getattr(f, "pooler_output", f)
  f = torch.nn.functional.normalize(f, dim=-1).numpy()  # measure_similarity, optimize_n.py:113-119
  assert similarity(target_image, other) == pytest.approx(float(f[0] @ f[1]), abs=2e-5)


# (f) -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "overrides, message",
  [
    (["evaluation.p4d.variants=()"], r"evaluation.p4d.variants must be a non-empty subset of \['n', 'k'\]"),
    (["evaluation.p4d.variants=('n', 'x')"], r"evaluation.p4d.variants must be a non-empty subset"),
    (["evaluation.p4d.prompt_len=0"], r"evaluation.p4d.prompt_len must lie in \[1, 75\]"),
    (["evaluation.p4d.prompt_len=76"], r"evaluation.p4d.prompt_len must lie in \[1, 75\]"),
    (["evaluation.p4d.every_k=0"], r"evaluation.p4d.every_k must be >= 1, got 0"),
    (["evaluation.p4d.iters=0", "evaluation.p4d.eval_step=1"], r"evaluation.p4d.iters must be >= 1, got 0"),
    (["evaluation.p4d.eval_step=41"], r"evaluation.p4d.eval_step must lie in \[1, iters=40\], got 41"),
    (["evaluation.p4d.eval_step=0"], r"evaluation.p4d.eval_step must lie in"),
    (["evaluation.p4d.images=0"], r"evaluation.p4d.images must be >= 1, got 0"),
    (["evaluation.p4d.target_images=0"], r"evaluation.p4d.target_images must be >= 1, got 0"),
    (["evaluation.p4d.selector="], r"evaluation.p4d.selector is empty"),
    (["evaluation.p4d.scheduler=dpm"], r"evaluation.p4d.scheduler is 'dpm'; expected one of \['ddim', 'lms'\]"),
    (["evaluation.budgets=(10, 25)"], r"evaluation.budgets \[25\]: P4D budgets are optimisation steps, multiples"),
    (["evaluation.budgets=(50,)"], r"evaluation.budgets \[50\]"),
    (["evaluation.latents=numpy"], r"config.evaluation.latents is 'numpy'"),
  ],
)
def test_bad_settings_name_their_key(overrides, message):
  with pytest.raises(ConfigError, match=message):
    _settings(*overrides)


def test_budgets_become_the_checkpoints():
  assert _settings().checkpoints == (40,)
  assert _settings("evaluation.budgets=(30, 10, 40)").checkpoints == (10, 30, 40)
  assert p4d.evaluation_steps(_settings(), 40) == [0, 10, 20, 30]  # optimize_n.py:150, :258: none at iters
  assert p4d.evaluation_steps(_settings(), 20) == [0, 10, 20]
  with pytest.raises(ConfigError, match="P4D variant 'x'"):
    p4d.layout(None, PROMPT, _settings(), "x")


@pytest.mark.bench
@pytest.mark.skipif(
  not os.environ.get("P4D_ORIGINAL"),
  reason="P4D_ORIGINAL (a clone of joycenerd/P4D) and P4D_ORIGINAL_PYTHON (an interpreter with its packages, "
  "benchmarks/p4d_original_tiny.py) are not set",
)
def test_original_optimize_beside_ours(tmp_path):
  """benchmarks/p4d_original_tiny.py: the authors' optimize_n/optimize_k and ours on one case, both running every
  step; the losses are independent draws, so both must fall from their first window (their run measured 0.0107 ->
  0.0039 over 200 steps, ours 0.0101 -> 0.0021, docs/evaluation.md)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [f"--original={os.environ['P4D_ORIGINAL']}", f"--original_python={os.environ['P4D_ORIGINAL_PYTHON']}"]
  args += [f"--out={tmp_path}", "--steps=40", "--block=10", "--variants=n"]
  script = os.path.join(root, "benchmarks", "p4d_original_tiny.py")
  env = {**os.environ, "OMP_NUM_THREADS": "1"}
  out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=root, env=env, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]["n"]
  assert set(runs) == {"original (optimize_n.py)", "ours (evals/p4d.py)"}
  for run in runs.values():
    losses = np.asarray(run["losses"])
    assert len(losses) >= 39 and losses[-10:].mean() < losses[:10].mean() and run["seconds_per_step"] > 0

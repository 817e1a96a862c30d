"""P4D (Chin et al., ICML 2024, "Prompting4Debugging"): the search core, as joycenerd/P4D runs it.

P4D finds a prompt on which the *attacked* (erased) model denoises like the *original* model does on the case's
prompt: PEZ (hard prompts made easy) on token embeddings, with the loss the MSE between the attacked model's
noise prediction, conditioned on the adversarial sequence, and the original model's, conditioned on the prompt
(conditional branch only, no CFG), on x_t noised from the VAE latent of the original model's image of the prompt
(prompt_optimization/optimize_n.py:137-241). Each step projects every continuous embedding to its nearest
vocabulary row by cosine (the whole vocabulary, SOT and EOT included), forwards the projected rows, and applies
the gradient with respect to them to the continuous ones with AdamW (:68-96, :150-249). Every `eval_step` steps
the projected tokens are decoded to text, rendered by the attacked model and compared with the target image;
the prompt kept is the most similar one over all evaluations (:258-278), not the one of lowest loss.

Two variants (`evaluation.p4d.variants`):
* N (optimize_n.py): `prompt_len` (16) learned tokens replace the prompt; the prompt enters through the target only.
* K (optimize_k.py): the prompt's tokens stay, with one learned token before every `every_k` (3) of them.

Each block of `eval_step` steps is one jitted `lax.fori_loop`, the models' parameters passed as arguments. The
learned rows are padded to one count for every prompt and variant (`slot_count`), so a model compiles one block.
The caller supplies the renderer and the image similarity (`renderer`, `make_selector`) and decides what a found
prompt means (the authors: any of 3 images at the prompt's seed unsafe, run_p4dn.py:236-249).

Where this differs from the original, and why:
* The adversarial sequence goes through the *attacked* text encoder (its vocabulary rows for the projection and
  the fixed positions). The original encodes it with the unerased SD's encoder (optimize_n.py:126, :183), the
  same weights for the UNet erasures it attacks (ESD, SLD); a text-encoder erasure (AdvUnlearn) is only attacked
  through its own encoder.
* P4D-K's prompt rows are not parameters. The original zeroes their gradient (optimize_k.py:255-256), so Adam
  never moves them and only AdamW's decay shrinks them (x0.99 a step); the cosine projection ignores length, so
  they project to the prompt's tokens every step, as here.
* Seeds: the original's initial tokens and timesteps are unseeded; here all draws come from the case's seed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import unlearndiff
from advunlearn_jax.models.clip_text import CLIPTextModel, encode_ids
from advunlearn_jax.models.pipeline_record import Pipeline
from advunlearn_jax.models.unet import UNet2DConditionModel

VARIANTS = ("n", "k")
MAX_LENGTH = tok_lib.MAX_LENGTH
# Part of a remembered search's fingerprint (evals/search_cache.py): bump it when what a search finds changes.
SEARCH_VERSION = 1
# optimize_n.py:38 and optimize_k.py:32: the training sequence is padded with id 0 ("!"), not the tokenizer's pad.
REFERENCE_PAD_ID = 0
# optimize_n.py:129: torch.optim.AdamW(lr=args.lr, weight_decay=args.weight_decay), torch's other defaults.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
NORM_EPS = 1e-12  # sentence_transformers' normalize_embeddings = torch.nn.functional.normalize (optimize_n.py:76)


class P4DConfig(NamedTuple):
  """config.evaluation.p4d under its field names, with the shared evaluation.budgets and latents (`from_config`;
  the defaults are config_lib's)."""

  variants: tuple[str, ...]  # n | k; a case is broken when any variant breaks it (the README's P4D-UNION)
  prompt_len: int  # P4D-N's learned tokens
  every_k: int  # P4D-K: one learned token before every every_k prompt tokens
  iters: int  # optimisation steps, no early stop
  eval_step: int  # steps between two selection evaluations
  lr: float  # AdamW
  weight_decay: float  # AdamW's decoupled decay
  target_images: int  # the original model's images of the prompt; the most concept-like is the target
  images: int  # the found prompt's images; broken if any shows the concept
  selector: str  # judge | a transformers CLIP folder (make_selector)
  sample_steps: int  # the selection and classified images
  scheduler: str
  # reference quirk: optimize_n.py:38, optimize_k.py:30-35 and :170 - the original's training sequences, N padded
  # with id 0 and K without an EOT (its tokens overwrite it); False: EOT after the tokens, the tokenizer's padding.
  reference_layout: bool
  # reference quirk: run_p4dn.py:171-177, optimize_n.py:138-144 - the target image enters the VAE as ToTensor's
  # [0, 1], not the [-1, 1] the VAE was trained on; False: [-1, 1].
  reference_image_range: bool
  budgets: tuple[int, ...]
  latents: str  # start latents of the rendered images: generation.LATENT_SOURCES

  @classmethod
  def from_config(cls, evaluation) -> P4DConfig:
    """`config.evaluation.p4d` (and the shared `evaluation.budgets` and `evaluation.latents`), validated."""
    section = evaluation.p4d
    given = {name: section[name] for name in cls._fields if name in section}
    cfg = cls(
      **{**given, "variants": tuple(str(v) for v in section.variants)},
      budgets=tuple(int(b) for b in evaluation.budgets),
      latents=evaluation.latents,
    )
    validate(cfg)
    return cfg

  @property
  def prefix_tokens(self) -> int:
    """Token slots P4D adds in front of a prompt for unlearndiff.screen: none. N replaces the prompt; K's room
    depends on the prompt's length and is `check_prompt`'s to check."""
    return 0

  @property
  def sampler(self) -> unlearndiff.Sampler:
    return unlearndiff.Sampler(self.scheduler, self.sample_steps, self.latents)

  @property
  def checkpoints(self) -> tuple[int, ...]:
    """The steps at which the selected prompt is reported: the budgets, or the whole run."""
    return tuple(sorted(set(self.budgets))) or (self.iters,)

  def describe(self) -> dict[str, Any]:
    """The settings, for report.json."""
    return {**self._asdict(), "variants": list(self.variants), "budgets": list(self.budgets)}


def validate(cfg: P4DConfig) -> None:
  key = "evaluation.p4d"
  if not cfg.variants or any(v not in VARIANTS for v in cfg.variants) or len(set(cfg.variants)) != len(cfg.variants):
    raise ConfigError(f"{key}.variants must be a non-empty subset of {list(VARIANTS)}, got {list(cfg.variants)}")
  if not 1 <= cfg.prompt_len <= MAX_LENGTH - 2:
    raise ConfigError(f"{key}.prompt_len must lie in [1, {MAX_LENGTH - 2}] (with SOT and EOT), got {cfg.prompt_len}")
  if cfg.every_k < 1:
    raise ConfigError(f"{key}.every_k must be >= 1, got {cfg.every_k}")
  if cfg.iters < 1:
    raise ConfigError(f"{key}.iters must be >= 1, got {cfg.iters}")
  if not 1 <= cfg.eval_step <= cfg.iters:
    raise ConfigError(f"{key}.eval_step must lie in [1, iters={cfg.iters}], got {cfg.eval_step}")
  if cfg.lr <= 0 or cfg.weight_decay < 0:
    raise ConfigError(f"{key}: lr must be > 0 and weight_decay >= 0, got {cfg.lr} and {cfg.weight_decay}")
  for name in ("images", "target_images", "sample_steps"):
    if getattr(cfg, name) < 1:
      raise ConfigError(f"{key}.{name} must be >= 1, got {getattr(cfg, name)}")
  if not cfg.selector.strip():
    raise ConfigError(
      f"{key}.selector is empty: judge (the tiny world's judge features) or a transformers CLIP folder (the "
      "authors' open_clip ViT-H-14 laion2b_s32b_b79k is laion/CLIP-ViT-H-14-laion2B-s32B-b79K on the Hub)"
    )
  cfg.sampler.check(key)
  check_budgets(cfg.budgets, cfg)


def check_budgets(budgets: Sequence[int], cfg: P4DConfig) -> None:
  """The prompt is selected at evaluations every eval_step steps, so a budget is a whole number of them (or the
  whole run)."""
  bad = [b for b in budgets if not 1 <= b <= cfg.iters or (b % cfg.eval_step and b != cfg.iters)]
  if bad:
    raise ConfigError(
      f"evaluation.budgets {bad}: P4D budgets are optimisation steps, multiples of p4d.eval_step={cfg.eval_step} "
      f"up to p4d.iters={cfg.iters}"
    )


# ----------------------------------------------------------------------------------------------------------------
# The training sequences


class Layout(NamedTuple):
  """One variant's training sequence for one prompt."""

  ids: np.ndarray  # int32 [77]: the sequence, 0 at the learned positions (their rows are replaced)
  learned: np.ndarray  # int32 [P]: the learned tokens' positions in the 77
  shown: np.ndarray  # int32 [S]: the positions whose (projected) tokens, decoded, are the found prompt


def n_layout(tokenizer, cfg: P4DConfig) -> Layout:
  """optimize_n.py:29-39: [SOT, prompt_len learned, EOT, padding]."""
  # reference quirk: optimize_n.py:38 - padded with id 0 (the UNet cross-attends to those rows too)
  pad = REFERENCE_PAD_ID if cfg.reference_layout else _pad_id(tokenizer)
  rest = MAX_LENGTH - cfg.prompt_len - 2
  ids = [tokenizer.bos_token_id] + [0] * cfg.prompt_len + [tokenizer.eos_token_id] + [pad] * rest
  learned = np.arange(1, cfg.prompt_len + 1, dtype=np.int32)
  return Layout(np.asarray(ids, np.int32), learned, learned)


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
  """optimize_k.py:23-24: the prompt's tokens without SOT and EOT, untruncated."""
  return tokenizer(prompt, verbose=False)["input_ids"][1:-1]


def k_learned_count(prompt_tokens: int, every_k: int) -> int:
  """optimize_k.py:26: int(len / every_k) + 1 learned tokens."""
  return prompt_tokens // every_k + 1


def k_layout(tokenizer, prompt: str, cfg: P4DConfig) -> Layout:
  """optimize_k.py:23-44 and :170: over the L + P slots after SOT, positions 0, k+1, 2(k+1), ... learn and the
  rest hold the prompt's tokens in order."""
  text = prompt_token_ids(tokenizer, prompt)
  _check_k_room(len(text), cfg.every_k, prompt)
  slots = np.arange(len(text) + k_learned_count(len(text), cfg.every_k))
  learns = slots % (cfg.every_k + 1) == 0
  body = np.zeros(len(slots), np.int64)
  body[~learns] = text
  if cfg.reference_layout:
    # reference quirk: optimize_k.py:30-35, :170 - the slots are written over [SOT, prompt, EOT, 0, ...] from
    # position 1, so the EOT at L + 1 is overwritten and the sequence has none; the rest is id 0
    tail = [REFERENCE_PAD_ID] * (MAX_LENGTH - 1 - len(slots))
  else:
    tail = [tokenizer.eos_token_id] + [_pad_id(tokenizer)] * (MAX_LENGTH - 2 - len(slots))
  ids = np.asarray([tokenizer.bos_token_id, *body.tolist(), *tail], np.int32)
  return Layout(ids, (1 + slots[learns]).astype(np.int32), (1 + slots).astype(np.int32))


def layout(tokenizer, prompt: str, cfg: P4DConfig, variant: str) -> Layout:
  if variant not in VARIANTS:
    raise ConfigError(f"P4D variant {variant!r}; expected one of {list(VARIANTS)}")
  return n_layout(tokenizer, cfg) if variant == "n" else k_layout(tokenizer, prompt, cfg)


def _pad_id(tokenizer) -> int:
  return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _check_k_room(length: int, every_k: int, prompt: str) -> None:
  learned = k_learned_count(length, every_k)
  if length + learned + 2 > MAX_LENGTH:  # optimize_k.py:31-35: the sequence would run past 77
    raise ConfigError(
      f"P4D-K (evaluation.p4d.variants, every_k={every_k}): a prompt of {length} tokens takes {learned} learned "
      f"tokens, {length + learned + 2} > {MAX_LENGTH} with SOT and EOT; the original cannot run it (drop k from "
      f"evaluation.p4d.variants or the prompt): {prompt[:80]!r}"
    )


def check_prompt(tokenizer, prompt: str, cfg: P4DConfig) -> None:
  """Before any work: with K among the variants, the prompt and its learned tokens fit in 77."""
  if "k" in cfg.variants:
    _check_k_room(len(prompt_token_ids(tokenizer, prompt)), cfg.every_k, prompt)


def slot_count(cfg: P4DConfig) -> int:
  """The learned rows every block carries: N's prompt_len, or the most any prompt that fits gives K; a variant
  or prompt with fewer leaves the rest out of the sequence (so one compiled block serves every case)."""
  counts = [cfg.prompt_len] if "n" in cfg.variants else []
  if "k" in cfg.variants:
    fits = [k_learned_count(n, cfg.every_k) for n in range(MAX_LENGTH)]
    counts.append(max(p for n, p in enumerate(fits) if n + p + 2 <= MAX_LENGTH))
  return max(counts)


# ----------------------------------------------------------------------------------------------------------------
# PEZ


def unit_rows(table: jax.Array) -> jax.Array:
  """Rows scaled to unit length: torch.nn.functional.normalize (sentence_transformers' normalize_embeddings)."""
  return table / jnp.maximum(jnp.linalg.norm(table, axis=-1, keepdims=True), NORM_EPS)


def nearest_ids(embeds: jax.Array, unit_table: jax.Array) -> jax.Array:
  """optimize_n.py:68-96: each row's nearest vocabulary row by cosine, top-1 over the whole vocabulary."""
  scores = jnp.matmul(unit_rows(embeds), unit_table.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def noised(x0: jax.Array, alphas: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """optimize_n.py:172-179: (x_t, t) with t uniform over the training steps and x_t = sqrt(abar) x0 +
  sqrt(1 - abar) noise (the scheduler's add_noise)."""
  k_t, k_noise = jax.random.split(key)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, alphas.shape[0])
  a = alphas[t][:, None, None, None]
  return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * jax.random.normal(k_noise, x0.shape), t


def denoising_gap(modules, params, proj, words, learned, xt, t, target_ctx) -> jax.Array:
  """optimize_n.py:181-241: MSE between the attacked UNet on the sequence (`words` [77, D] with the projected rows
  `proj` [P, D] at `learned`; rows past 77 are left out) through the attacked text encoder, and the original UNet
  on the original encoder's embedding of the prompt; conditional branch only."""
  text, unet, original_unet = modules
  seq = words.at[learned].set(proj, mode="drop")
  ctx = text.apply({"params": params["text"]}, inputs_embeds=seq[None]).last_hidden_state
  eps = unet.apply({"params": params["unet"]}, xt, t, jnp.broadcast_to(ctx, (xt.shape[0], *ctx.shape[1:])))
  ref = original_unet.apply({"params": params["original_unet"]}, xt, t, target_ctx)
  return jnp.mean((eps.astype(jnp.float32) - jax.lax.stop_gradient(ref).astype(jnp.float32)) ** 2)


@functools.cache
def _modules(text_config, unet_config, original_unet_config):
  return CLIPTextModel(text_config), UNet2DConditionModel(unet_config), UNet2DConditionModel(original_unet_config)


@functools.cache
def _gap_fn(text_config, unet_config, original_unet_config):
  """Jitted (loss, gradient w.r.t. the projected rows) on given inputs (tests, held-out losses)."""
  modules = _modules(text_config, unet_config, original_unet_config)
  return jax.jit(jax.value_and_grad(functools.partial(denoising_gap, modules), argnums=1))


@functools.cache
def _block_fn(text_config, unet_config, original_unet_config, lr: float, weight_decay: float, steps: int):
  """The jitted inner loop: `steps` PEZ steps from global step `start` (compiled once per models and settings)."""
  modules = _modules(text_config, unet_config, original_unet_config)
  # torch's AdamW decays p by lr * wd before its Adam step, which does not depend on p; optax's adds lr * wd * p to
  # the same Adam step: the same update (tests/test_p4d.py checks it step by step).
  tx = optax.adamw(lr, b1=ADAM_BETAS[0], b2=ADAM_BETAS[1], eps=ADAM_EPS, weight_decay=weight_decay)
  grad_fn = jax.value_and_grad(functools.partial(denoising_gap, modules), argnums=1)

  @jax.jit
  def block(embeds, opt_state, start, key, params, words, learned, unit_table, x0, alphas, target_ctx):
    table = params["text"]["embeddings"]["token_embedding"]["embedding"]

    def body(i, carry):
      embeds, opt_state, losses = carry
      proj = table[nearest_ids(embeds, unit_table)]  # forward the projected rows ...
      xt, t = noised(x0, alphas, jax.random.fold_in(key, start + i))
      loss, grad = grad_fn(params, proj, words, learned, xt, t, target_ctx)
      updates, opt_state = tx.update(grad, opt_state, embeds)  # ... and step the continuous ones with their gradient
      return optax.apply_updates(embeds, updates), opt_state, losses.at[i].set(loss)

    return jax.lax.fori_loop(0, steps, body, (embeds, opt_state, jnp.zeros((steps,), jnp.float32)))

  return block, tx


class Problem(NamedTuple):
  """One case and variant, ready to optimise: everything the steps read and never change."""

  layout: Layout
  tokenizer: Any
  modules: tuple  # (attacked text encoder, attacked UNet, original UNet)
  block: Callable
  tx: optax.GradientTransformation
  key: jax.Array
  params: dict  # text, unet (attacked), original_unet
  words: jax.Array  # [77, D]: the attacked encoder's rows of layout.ids
  learned: jax.Array  # [slots]: layout.learned, padded with MAX_LENGTH (left out of the sequence)
  unit_table: jax.Array  # [V, D]: the attacked encoder's vocabulary rows, unit length
  x0: jax.Array  # [1, h, w, c]: the target's latent, one posterior sample, scaled
  alphas: jax.Array
  target_ctx: jax.Array  # [1, 77, D]: the original encoder's embedding of the prompt
  init: jax.Array  # [slots, D]: the starting embeddings


def target_latent(pipe: Pipeline, image: np.ndarray, key: jax.Array, reference_range: bool) -> jax.Array:
  """optimize_n.py:137-144: one VAE posterior sample of the target image, drawn once per case, times the VAE's
  scaling factor (the original writes SD's 0.18215)."""
  size = generation.image_size(pipe)
  if image.shape != (size, size, 3):
    raise ValueError(f"P4D target image of shape {image.shape}; the model draws ({size}, {size}, 3)")
  x = jnp.asarray(image, jnp.float32)[None]
  # reference quirk: run_p4dn.py:171-177 - ToTensor's [0, 1], with no Normalize, goes into vae.encode
  x = x / 255.0 if reference_range else x / 127.5 - 1.0
  mean, std = generation.encode_posteriors(pipe.vae_config, pipe.vae_params, x)
  return (mean + std * jax.random.normal(key, mean.shape)) * pipe.vae_config.scaling_factor


def prepare(
  original: Pipeline, target: Pipeline, prompt: str, target_image: np.ndarray, cfg: P4DConfig, variant: str, seed: int
) -> Problem:
  """The case's problem for `variant`: `target` is the attacked model, `original` the unerased one (its VAE
  encodes the target image, its encoder and UNet give the target prediction)."""
  tokenizer = tok_lib.load_tokenizer(target.tokenizer_dir)
  lay = layout(tokenizer, prompt, cfg, variant)
  slots = slot_count(cfg)
  configs = (target.text_config, target.unet_config, original.unet_config)
  modules = _modules(*configs)
  block, tx = _block_fn(*configs, cfg.lr, cfg.weight_decay, cfg.eval_step)
  init_key, latent_key, key = jax.random.split(jax.random.key(seed), 3)
  table = target.text_params["embeddings"]["token_embedding"]["embedding"]
  # optimize_n.py:25, optimize_k.py:38: ids uniform over the vocabulary (SOT and EOT possible); unseeded there
  init = table[jax.random.randint(init_key, (slots,), 0, table.shape[0])]
  learned = np.full((slots,), MAX_LENGTH, np.int32)
  learned[: len(lay.learned)] = lay.learned
  target_ids = tok_lib.tokenize(tok_lib.load_tokenizer(original.tokenizer_dir), [prompt])
  return Problem(
    layout=lay,
    tokenizer=tokenizer,
    modules=modules,
    block=block,
    tx=tx,
    key=key,
    params={"text": target.text_params, "unet": target.unet_params, "original_unet": original.unet_params},
    words=modules[0].apply({"params": target.text_params}, jnp.asarray(lay.ids), method="word_embeddings"),
    learned=jnp.asarray(learned),
    unit_table=unit_rows(table),
    x0=target_latent(original, target_image, latent_key, cfg.reference_image_range),
    alphas=jnp.asarray(original.schedule.alphas_cumprod_diffusers(), jnp.float32),
    target_ctx=encode_ids(original.text_config, original.text_params, jnp.asarray(target_ids)),
    init=init,
  )


def advance(problem: Problem, embeds: jax.Array, opt_state: Any, start: int) -> tuple[jax.Array, Any, jax.Array]:
  """One block of PEZ steps from global step `start`: (embeds, opt_state, the steps' losses)."""
  p = problem
  return p.block(
    embeds, opt_state, start, p.key, p.params, p.words, p.learned, p.unit_table, p.x0, p.alphas, p.target_ctx
  )


def projected_sequence(problem: Problem, embeds: jax.Array) -> np.ndarray:
  """The [77] ids the step forwards: the layout with each learned row's nearest token."""
  ids = problem.layout.ids.copy()
  n = len(problem.layout.learned)
  ids[problem.layout.learned] = np.asarray(nearest_ids(embeds, problem.unit_table))[:n]
  return ids


def decode(problem: Problem, embeds: jax.Array) -> str:
  """optimize_n.py:50-65, :259: the projected tokens decoded to text (K: the prompt's tokens among them)."""
  return problem.tokenizer.decode([int(i) for i in projected_sequence(problem, embeds)[problem.layout.shown]])


def held_out_loss(problem: Problem, embeds: jax.Array, draws: int = 16) -> float:
  """The loss of the projected rows, averaged over `draws` fixed (t, noise) draws: comparable across steps,
  unlike one step's loss at its own random t."""
  table = problem.params["text"]["embeddings"]["token_embedding"]["embedding"]
  proj = table[nearest_ids(embeds, problem.unit_table)]
  gap = _gap_fn(*(m.config for m in problem.modules))
  key = jax.random.fold_in(problem.key, 1 << 30)  # a stream the steps never reach (they fold in 0, 1, ...)
  total = 0.0
  for i in range(draws):
    xt, t = noised(problem.x0, problem.alphas, jax.random.fold_in(key, i))
    loss, _ = gap(problem.params, proj, problem.words, problem.learned, xt, t, problem.target_ctx)
    total += float(loss)
  return total / draws


# ----------------------------------------------------------------------------------------------------------------
# Selection and the search


class Checkpoint(NamedTuple):
  step: int  # optimisation steps spent
  prompt: str  # the prompt selected among the evaluations at steps <= step
  similarity: float  # its image's similarity to the target image


def evaluation_steps(cfg: P4DConfig, last: int) -> list[int]:
  """optimize_n.py:150, :258: evaluations at the steps 0, eval_step, ... before iters (the last iters - eval_step
  steps of a run are never evaluated), up to the checkpoint `last`."""
  return list(range(0, min(last, cfg.iters - 1) + 1, cfg.eval_step))


def search(
  original: Pipeline,
  target: Pipeline,
  prompt: str,
  target_image: np.ndarray,
  cfg: P4DConfig,
  variant: str,
  seed: int,
  render: Callable[[str], np.ndarray],
  similarity: Callable[[np.ndarray, np.ndarray], float],
  checkpoints: Sequence[int] | None = None,
  log: Callable[[str], None] | None = None,
) -> Iterator[Checkpoint]:
  """P4D-`variant` on one case: at each checkpoint (optimisation steps; cfg.checkpoints when None), the prompt of
  highest `similarity(target_image, render(prompt))` among the evaluations so far (ties: the first), yielded as
  soon as it is known, so a caller that stops at a success pays no further step. The steps after the last
  evaluation a checkpoint needs are not run: they cannot change what it returns."""
  validate(cfg)
  checkpoints = sorted(set(checkpoints or cfg.checkpoints))
  check_budgets(checkpoints, cfg)
  problem = prepare(original, target, prompt, target_image, cfg, variant, seed)
  embeds, opt_state = problem.init, problem.tx.init(problem.init)
  best_prompt, best = "", -np.inf  # optimize_n.py:146: the first evaluation is always kept
  losses = np.zeros((0,), np.float32)
  steps = evaluation_steps(cfg, checkpoints[-1])
  pending = list(checkpoints)
  for i, step in enumerate(steps):
    if step:
      embeds, opt_state, block_losses = advance(problem, embeds, opt_state, step - cfg.eval_step)
      losses = np.asarray(block_losses)
    text = decode(problem, embeds)
    score = float(similarity(target_image, render(text)))
    if score > best:  # optimize_n.py:276-278
      best_prompt, best = text, score
    if log is not None:
      loss = f"loss {float(np.mean(losses)):.4f}, " if len(losses) else ""
      status = f"{loss}similarity {score:.4f}, best {best:.4f} {best_prompt!r}"
      log(f"P4D-{variant.upper()}: step {step}/{checkpoints[-1]}, {status}")
    following = steps[i + 1] if i + 1 < len(steps) else None
    while pending and (following is None or following > pending[0]):  # no later evaluation counts for it
      yield Checkpoint(pending.pop(0), best_prompt, best)


def renderer(pipe: Pipeline, seed: int, guidance: float, sampler) -> Callable[[str], np.ndarray]:
  """optimize_n.py:262-273: a prompt as text, tokenised as any prompt and rendered by the attacked model at the
  case's seed and guidance (one image). The original's generator is seeded once per case and advances across its
  evaluations; here every evaluation starts from the seed's latents, so prompts are compared on the same noise."""
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  uncond = unlearndiff.empty_prompt(pipe, pipe.text_params, 1)

  def render(text: str) -> np.ndarray:
    ids = tok_lib.tokenize(tokenizer, [text])
    return unlearndiff.render_ids(pipe, ids, seed, guidance, sampler, pipe.text_params, uncond)[0]

  return render


def make_selector(spec: str) -> Callable[[np.ndarray, np.ndarray], float]:
  """The image similarity that picks the prompt (optimize_n.py:99-119: cosine of image embeddings). `judge`: the
  tiny world's judge's penultimate (fc) features; otherwise a transformers CLIP folder's image embeddings (the
  authors': open_clip ViT-H-14 laion2b_s32b_b79k, laion/CLIP-ViT-H-14-laion2B-s32B-b79K on the Hub)."""
  if not spec.strip():
    raise ConfigError("evaluation.p4d.selector is empty: judge or a transformers CLIP folder")
  features = _judge_features() if spec == "judge" else _clip_features(spec)

  def similarity(a: np.ndarray, b: np.ndarray) -> float:
    fa, fb = np.asarray(features(np.stack([a, b])), np.float64)
    return float(fa @ fb / (np.linalg.norm(fa) * np.linalg.norm(fb)))

  return similarity


@functools.partial(jax.jit, static_argnums=0)
def _judge_fc(config, params, images):
  import flax.linen as nn

  from advunlearn_jax.tiny import judge as judge_lib

  _, state = judge_lib.Judge(config).apply(
    {"params": params}, images, capture_intermediates=lambda m, _: m.name == "fc", mutable=["intermediates"]
  )
  return nn.gelu(state["intermediates"]["fc"]["__call__"][0])  # the judge's own activation after fc


def _judge_features() -> Callable[[np.ndarray], np.ndarray]:
  from advunlearn_jax.tiny import judge as judge_lib
  from advunlearn_jax.tiny import quality

  config, params = judge_lib.load(quality.JUDGE_DIR)
  return lambda images: _judge_fc(config, params, jnp.asarray(images, jnp.float32) / 127.5 - 1.0)


def _clip_features(folder: str) -> Callable[[np.ndarray], np.ndarray]:
  from advunlearn_jax.evals import clip_score

  return clip_score.CLIPScorer(folder).image_features

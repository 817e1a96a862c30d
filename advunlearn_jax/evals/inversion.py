"""Concept inversion: textual inversion against the erased model, the attack that circumvents most erasures.

Pham et al. (2023) showed that erased models still hold the concept: k new token embeddings learned from
images of it, with the standard denoising loss through the *erased* model (Gal et al.'s textual inversion),
bring it back. Here the k embeddings are continuous (not vocabulary tokens, which is what makes this stronger
than UnlearnDiffAtk's discrete search) and sit in the k prefix positions UnlearnDiffAtk uses; the text they are
trained in is an evaluation prompt drawn at random each step, so they learn to bring the concept back into the
very prompts they are tested on. Text encoder and UNet stay frozen; Adam on the embeddings only; each block of
steps is one jitted loop. One learned prefix serves every prompt: each prompt is then rendered with it at its
own seed and the classifier decides.

Budgets: the embeddings are checkpointed at each budget (optimisation steps); a prompt's attack stops at its
first success, so a prompt counts at budget b when any checkpoint <= b showed the concept (evals/budgets.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from advunlearn_jax import tokenizer as tok_lib
from advunlearn_jax.convert.diffusers import Pipeline
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import unlearndiff
from advunlearn_jax.models.clip_text import CLIPTextModel
from advunlearn_jax.models.unet import UNet2DConditionModel

TINY_WORLD = "tiny_world:"


class InversionConfig(NamedTuple):
  tokens: int = 3
  steps: int = 300  # Adam steps; the last checkpoint when `budgets` is empty
  lr: float = 5e-3
  batch: int = 4
  budgets: tuple[int, ...] = ()  # checkpoints (steps) at which every unsolved prompt is rendered and judged
  scheduler: str = "lms"  # the classified images
  sample_steps: int = 50
  latents: str = "jax"

  @property
  def checkpoints(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.budgets))) or (self.steps,)

  @property
  def sampler(self) -> unlearndiff.Sampler:
    return unlearndiff.Sampler(self.scheduler, self.sample_steps, self.latents)


def config_from(evaluation) -> InversionConfig:
  section = evaluation.inversion
  cfg = InversionConfig(
    tokens=section.tokens,
    steps=section.steps,
    lr=section.lr,
    batch=section.batch,
    budgets=tuple(int(b) for b in evaluation.budgets),
    scheduler=section.scheduler,
    sample_steps=section.sample_steps,
    latents=evaluation.latents,
  )
  validate(cfg)
  return cfg


def validate(cfg: InversionConfig) -> None:
  if cfg.tokens < 1 or cfg.steps < 1 or cfg.batch < 1:
    raise ConfigError("evaluation.inversion needs tokens, steps and batch >= 1")
  if any(b < 1 for b in cfg.budgets):
    raise ConfigError(f"evaluation.budgets for inversion are optimisation steps >= 1, got {cfg.budgets}")
  generation.check_latent_source(cfg.latents, "evaluation.latents")


def concept_images(source: str, limit: int, size: int, seed: int = 0) -> np.ndarray:
  """uint8 [N, size, size, 3] images of the concept: `tiny_world:VALUE` renders VALUE with the other attributes
  random; otherwise a folder or tfds source (evals/fid.open_images), centre-cropped and resized to `size`."""
  from PIL import Image

  if not source:
    raise ConfigError(
      "evaluation.attack=inversion needs evaluation.inversion.images (a folder, tfds:..., tiny_world:VALUE)"
    )
  n = limit if limit > 0 else 64
  if source.startswith(TINY_WORLD):
    from advunlearn_jax.tiny import world

    try:
      kind, index = world.attribute_of(source[len(TINY_WORLD) :])
    except ValueError as e:
      raise ConfigError(f"evaluation.inversion.images={source!r}: {e}") from e
    rng = np.random.default_rng(seed)
    attrs = world.sample_attributes(rng, n)._replace(**{kind: np.full(n, index)})
    images = world.render(attrs, rng)
    if images.shape[1] != size:
      raise ConfigError(f"evaluation.inversion.images={source!r} renders {images.shape[1]} px; the model draws {size}")
    return (images * 255).round().astype(np.uint8)
  from advunlearn_jax.evals import fid

  out = []
  for image in fid.open_images(source, "evaluation.inversion.images", n):
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top : top + side, left : left + side])
    out.append(np.asarray(square.resize((size, size), Image.BICUBIC)))
  return np.stack(out)


@functools.cache
def _block_fn(unet_config, text_config, cfg: InversionConfig):
  """Jitted: Adam steps [start, stop) of the denoising loss on the k embeddings (compiled once per model)."""
  unet = UNet2DConditionModel(unet_config)
  text = CLIPTextModel(text_config)
  tx = optax.adam(cfg.lr)

  def loss_fn(embeds, key, params, words, x0, alphas):
    k_img, k_prompt, k_t, k_noise = jax.random.split(key, 4)
    images = x0[jax.random.randint(k_img, (cfg.batch,), 0, x0.shape[0])]
    seq = words[jax.random.randint(k_prompt, (cfg.batch,), 0, words.shape[0])]
    seq = seq.at[:, 1 : 1 + cfg.tokens].set(jnp.broadcast_to(embeds, (cfg.batch, *embeds.shape)))
    ctx = text.apply({"params": params["text"]}, inputs_embeds=seq).last_hidden_state
    t = jax.random.randint(k_t, (cfg.batch,), 0, alphas.shape[0])
    noise = jax.random.normal(k_noise, images.shape)
    a = alphas[t][:, None, None, None]
    eps = unet.apply({"params": params["unet"]}, jnp.sqrt(a) * images + jnp.sqrt(1 - a) * noise, t, ctx)
    return jnp.mean((eps - noise) ** 2)

  @jax.jit
  def block(embeds, opt_state, key, params, words, x0, alphas, start, stop):
    def body(i, carry):
      embeds, opt_state, _ = carry
      loss, grad = jax.value_and_grad(loss_fn)(embeds, jax.random.fold_in(key, i), params, words, x0, alphas)
      updates, opt_state = tx.update(grad, opt_state, embeds)
      return optax.apply_updates(embeds, updates), opt_state, loss

    return jax.lax.fori_loop(start, stop, body, (embeds, opt_state, jnp.zeros(())))

  return block, tx


@functools.partial(jax.jit, static_argnums=0)
def _encode_embeds(text_config, params, seq):
  return CLIPTextModel(text_config).apply({"params": params}, inputs_embeds=seq).last_hidden_state


def nearest_words(tokenizer, embeds: np.ndarray, table: np.ndarray) -> str:
  """Each learned embedding's nearest vocabulary token by cosine similarity, decoded: what the prefix 'means'."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  ids = np.argmax(unit(np.asarray(embeds)) @ unit(np.asarray(table)).T, axis=-1)
  return " ".join(tokenizer.decode([int(i)]).strip() for i in ids)


class Result(NamedTuple):
  outcomes: list  # unlearndiff.Outcome per prompt; `iterations` is the checkpoint that first succeeded
  losses: list[float]  # the denoising loss at each checkpoint
  learned: dict[int, str]  # checkpoint -> the prefix's nearest vocabulary words
  train_seconds: float


def attack_prompts(
  pipe: Pipeline,
  prompts: Sequence,
  images: np.ndarray,
  classifier: unlearndiff.Classifier,
  cfg: InversionConfig,
  *,
  attack: bool = True,
  seed: int = 0,
  log=print,
) -> Result:
  """The no-attack pass for every prompt, then (with `attack`) inversion on `images` and, at each checkpoint,
  every prompt not yet shown rendered with the learned prefix. `pipe` is the erased model."""
  validate(cfg)
  start = time.perf_counter()
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  ids = [tok_lib.tokenize(tokenizer, [p.prompt])[0] for p in prompts]
  for p in prompts:
    if not unlearndiff.fits(tokenizer(p.prompt)["input_ids"], cfg.tokens):
      raise ConfigError(f"prompt leaves no room for {cfg.tokens} prefix tokens: {p.prompt[:80]!r}")
  uncond = unlearndiff.empty_prompt(pipe, pipe.text_params, 1)
  pre_images = [
    unlearndiff.render_ids(pipe, row[None], p.seed, p.guidance, cfg.sampler, pipe.text_params, uncond)[0]
    for p, row in zip(prompts, ids)
  ]
  pre = [bool(classifier(image[None])[0]) for image in pre_images]
  done: dict[int, Any] = {
    i: unlearndiff.Outcome(p.prompt, p.seed, p.guidance, pre[i], pre[i], "", "", -1, 0, 0.0, pre_images[i])
    for i, p in enumerate(prompts)
    if pre[i] or not attack
  }
  if not attack:
    return Result([done[i] for i in range(len(prompts))], [], {}, 0.0)

  text = CLIPTextModel(pipe.text_config)
  seqs = np.stack([unlearndiff.prefix_ids(row, cfg.tokens, placeholder=0) for row in ids])
  words = text.apply({"params": pipe.text_params}, jnp.asarray(seqs), method="word_embeddings")
  x0 = jnp.concatenate(
    [generation.encode_images(pipe, images[i : i + 64]) for i in range(0, len(images), 64)]  # VAE in chunks
  )
  table = pipe.text_params["embeddings"]["token_embedding"]["embedding"]
  init_key, key = jax.random.split(jax.random.key(seed))
  init_ids = jax.random.randint(init_key, (cfg.tokens,), 0, table.shape[0] - 2)
  embeds = table[init_ids]  # random vocabulary words: no hint of the concept
  block, tx = _block_fn(pipe.unet_config, pipe.text_config, cfg)
  opt_state = tx.init(embeds)
  params = {"text": pipe.text_params, "unet": pipe.unet_params}
  alphas = jnp.asarray(pipe.schedule.alphas_cumprod_diffusers(), jnp.float32)
  losses, learned, last_images, previous, train_seconds = [], {}, {}, 0, 0.0
  for budget in cfg.checkpoints:
    t0 = time.perf_counter()
    embeds, opt_state, loss = block(embeds, opt_state, key, params, words, x0, alphas, previous, budget)
    losses.append(float(loss))
    train_seconds += time.perf_counter() - t0
    previous = budget
    learned[budget] = nearest_words(tokenizer, np.asarray(embeds), np.asarray(table))
    log(f"inversion: {budget} steps, loss {losses[-1]:.4f}, nearest words {learned[budget]!r}")
    for i, p in enumerate(prompts):
      if i in done:
        continue
      seq = jnp.asarray(words[i]).at[1 : 1 + cfg.tokens].set(embeds)[None]
      cond = _encode_embeds(pipe.text_config, pipe.text_params, seq)
      image = unlearndiff.render_context(pipe, cond, uncond, p.seed, p.guidance, cfg.sampler)[0]
      last_images[i] = image
      if bool(classifier(image[None])[0]):
        done[i] = _outcome(p, True, learned[budget], budget, time.perf_counter() - start, image)
  for i, p in enumerate(prompts):
    if i not in done:
      done[i] = _outcome(p, False, learned[previous], previous, time.perf_counter() - start, last_images[i])
  return Result([done[i] for i in range(len(prompts))], losses, learned, train_seconds)


def _outcome(p, success: bool, words: str, budget: int, seconds: float, image: np.ndarray) -> unlearndiff.Outcome:
  return unlearndiff.Outcome(
    prompt=p.prompt,
    seed=p.seed,
    guidance=p.guidance,
    pre_success=False,
    success=success,
    adv_tokens=words,
    adv_prompt=f"<{words}> {p.prompt}",
    timestep=-1,
    iterations=budget,
    seconds=seconds,
    image=image,
  )

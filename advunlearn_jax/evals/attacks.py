"""The robustness attacks `evaluation.attack` names, one object each behind one interface: their settings from the
config (which also say the prompt room they need and describe themselves), how they run on the screened prompts,
what they release (`release`: the found prompts as a CSV, or CCE's learned embedding), and how reports and budget
plots name them. The evaluate command and the reports ask the attack; nothing compares attack names.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.diffusion.text_side import TextSide
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import found_prompts, inversion, mma, p4d, ring_a_bell, search_cache, unlearndiff


class Run(NamedTuple):
  outcomes: list  # unlearndiff.Outcome per prompt, in order
  targets: np.ndarray  # the image shown beside each prompt's in the report's grids
  extra: dict[str, Any]  # attack-specific report.json fields
  found: Any = None  # what `release` writes besides the outcomes (CCE: its embeddings per checkpoint)


def _checkpoints(evaluation: ml_collections.ConfigDict, most: int) -> tuple[int, ...]:
  """The budgets at which a search's prompt is judged: evaluation.budgets, else only its whole budget."""
  return tuple(sorted({int(b) for b in evaluation.budgets})) or (most,)


def _release_csv(name: str):
  def release(out_dir: str, prompts: Sequence, run: Run, cfg) -> list[str]:
    """The found prompts, one row per case (found_prompts.write_csv); the files' names."""
    del cfg
    found_prompts.write_csv(os.path.join(out_dir, found_prompts.CSV_NAME), prompts, run.outcomes, name)
    return [found_prompts.CSV_NAME]

  return staticmethod(release)


class UnlearnDiffAtk:
  """The paper's attack (spec 6.1): discrete prefix tokens per prompt, against the original model's image."""

  name = "unlearndiff"
  on_sdxl = True  # its soft tokens are rows of both towers' tables (diffusion/text_side.py)
  budget_label = "UnlearnDiffAtk attack iterations"

  @staticmethod
  def settings(config: ml_collections.ConfigDict) -> unlearndiff.UnlearnDiffConfig:
    return unlearndiff.UnlearnDiffConfig.from_config(config.evaluation)

  @staticmethod
  def check_prompts(cfg: unlearndiff.UnlearnDiffConfig, prompts: Sequence) -> None:
    del cfg, prompts  # any prompt: the prefix tokens' room is `unlearndiff.screen`'s to check

  @staticmethod
  def title(described: dict[str, Any]) -> str:
    a = described
    return f"UnlearnDiffAtk (k={a['k']}, {a['iters_per_t']} iterations x {len(a['timesteps'])} timesteps)"

  @staticmethod
  def target_protocol(evaluation: ml_collections.ConfigDict) -> dict[str, Any] | str:
    ev = evaluation
    return {"scheduler": ev.target_scheduler, "steps": ev.target_steps, "guidance": ev.target_guidance or "per prompt"}

  @staticmethod
  def run(original, target, prompts, classifier, cfg, config, attack: bool, progress: Callable, log=print) -> Run:
    del log  # each prompt reports through `progress` as it ends (minutes per prompt on SD)
    targets = target_images(original, prompts, config.evaluation)
    outcomes = []
    for p, image in zip(prompts, targets):
      o = unlearndiff.attack_prompt(
        target, p.prompt, image, classifier, cfg, seed=p.seed, guidance=p.guidance, attack=attack
      )
      progress(len(outcomes), o)
      outcomes.append(o)
    return Run(outcomes, targets, {})

  release = _release_csv("unlearndiff")


class ConceptInversion:
  """Concept inversion (evals/inversion.py): by default the published CCE, one learned token for every prompt."""

  name = "inversion"
  on_sdxl = True  # one learned row per tower, as diffusers' textual_inversion_sdxl.py learns an added token
  budget_label = "inversion optimisation steps"

  @staticmethod
  def settings(config: ml_collections.ConfigDict) -> inversion.InversionConfig:
    return inversion.InversionConfig.from_config(config)

  @staticmethod
  def check_prompts(cfg: inversion.InversionConfig, prompts: Sequence) -> None:
    inversion.check_prompts(cfg, prompts)

  @staticmethod
  def title(described: dict[str, Any]) -> str:
    a = described
    name = "CCE concept inversion" if a["protocol"] == "cce" else "prefix concept inversion"
    where = "in the concept word's place" if a.get("placement", "prefix") == "word" else "in front of the prompt"
    return f"{name} ({a['tokens']} learned embeddings {where}, {max(a['budgets'] or [a['steps']])} steps)"

  @staticmethod
  def target_protocol(evaluation: ml_collections.ConfigDict) -> dict[str, Any] | str:
    del evaluation
    return "none (inversion learns from evaluation.inversion.images)"

  @staticmethod
  def run(original, target, prompts, classifier, cfg, config, attack: bool, progress: Callable, log=print) -> Run:
    from advunlearn_jax.diffusion import generation

    del original  # it learns from images of the concept, not from the original model's
    learned_at = None
    if cfg.learned:  # released embeddings: nothing is learned, no concept images are needed
      saved = inversion.load_learned(cfg.learned, cfg, TextSide.of(target).widths)
      cfg, learned_at = cfg._replace(budgets=tuple(sorted(saved))), saved.__getitem__
      size = generation.image_size(target)
      images = np.zeros((0, size, size, 3), np.uint8)
    else:
      images = inversion.concept_images(
        config.evaluation.inversion.images,
        cfg.max_images,
        generation.image_size(target),
        seed=config.seed,
        center_crop=cfg.protocol != "cce",
      )
    result = inversion.attack_prompts(
      target, prompts, images, classifier, cfg, attack=attack, seed=config.seed, log=log, learned_at=learned_at
    )
    for i, o in enumerate(result.outcomes):  # one training serves every prompt: their outcomes arrive together
      progress(i, o)
    extra = {
      "inversion": {
        "images": len(images),
        "losses": result.losses,
        "nearest_words": {str(b): w for b, w in result.learned.items()},
        "train_seconds": result.train_seconds,
      }
    }
    targets = images[: len(prompts)] if len(images) else np.stack([o.image for o in result.outcomes])
    return Run(result.outcomes, targets, extra, result.embeddings)

  @staticmethod
  def release(out_dir: str, prompts: Sequence, run: Run, cfg) -> list[str]:
    """The learned embeddings at each checkpoint, which `evaluation.inversion.learned` renders in the same
    places on another model (a prompt's text cannot carry them)."""
    del prompts
    if not run.found:
      return []
    inversion.save_learned(os.path.join(out_dir, inversion.LEARNED_NAME), run.found, cfg)
    return [inversion.LEARNED_NAME]


class RingABell:
  """Ring-A-Bell (evals/ring_a_bell.py): a genetic search on the original text encoder towards the prompt's
  embedding plus eta times the concept vector; its prompt replaces the evaluation prompt."""

  name = "ring_a_bell"
  on_sdxl = False  # its authors' code and ours read SD 1.x's one text encoder
  budget_label = "Ring-A-Bell generations"

  @staticmethod
  def settings(config: ml_collections.ConfigDict) -> ring_a_bell.RingABellConfig:
    return ring_a_bell.RingABellConfig.from_config(config.evaluation)

  @staticmethod
  def check_prompts(cfg, prompts: Sequence) -> None:
    del cfg, prompts  # its prompt replaces the evaluation prompt, which only sets its target

  @staticmethod
  def title(described: dict[str, Any]) -> str:
    a = described
    return f"Ring-A-Bell (K={a['length']}, eta={a['eta']}, {a['generations']} generations of {a['population']})"

  @staticmethod
  def target_protocol(evaluation: ml_collections.ConfigDict) -> dict[str, Any] | str:
    return {"concept_vector": evaluation.ring_a_bell.vector, "text_encoder": "the original model's"}

  @staticmethod
  def run(original, target, prompts, classifier, cfg, config, attack: bool, progress: Callable, log=print) -> Run:
    from advunlearn_jax.data import tokenizer as tok_lib

    tokenizer = tok_lib.load_tokenizer(original.tokenizer_dir)
    checkpoints = _checkpoints(config.evaluation, cfg.generations)
    cache = search_cache.for_folder(config.evaluation.search_cache)
    encoder = search_cache.encoder_fingerprint(original.text_config, original.text_params, tokenizer)
    vector = None

    def search(i, p):
      nonlocal vector
      if vector is None:
        vector = ring_a_bell.concept_vector(original.text_config, original.text_params, tokenizer, cfg.vector)
      goal = ring_a_bell.target_embedding(
        original.text_config, original.text_params, tokenizer, p.prompt, vector, cfg.eta
      )
      seed = config.evaluation.seed + zlib.crc32(p.prompt.encode())  # one search per prompt, as the authors run it
      # The search is a function of its target (the original encoder, vector, eta and prompt), the genetic
      # settings, the seed and the generations reported; nothing of the attacked model.
      genetic = (cfg.population, cfg.generations, cfg.mutate_rate, cfg.crossover_rate, cfg.length, cfg.mutate_best)
      settings = ("ring_a_bell", ring_a_bell.SEARCH_VERSION, encoder, genetic, seed, checkpoints)
      key = search_cache.fingerprint(goal, settings)

      def compute():
        found = ring_a_bell.search(original.text_config, original.text_params, goal, cfg, seed, checkpoints)
        found = [(g, ring_a_bell.prompt_text(tokenizer, ids)) for g, ids, _ in found]
        log(f"Ring-A-Bell: {p.prompt[:50]!r} -> {found[-1][1][:60]!r}")
        return found

      yield from cache.all_at_once(key, compute)

    outcomes = found_prompts.judged_cases(
      target, prompts, classifier, cfg.sampler, search, attack=attack, progress=progress
    )
    return Run(outcomes, np.stack([o.image for o in outcomes]), {})

  release = _release_csv("ring_a_bell")


class P4D:
  """P4D (evals/p4d.py): PEZ prompts on the attacked model that make it denoise the original model's image of the
  prompt as the original model does; a case is broken if any variant (N, K) breaks it (P4D-UNION)."""

  name = "p4d"
  on_sdxl = False  # its authors' code and ours read SD 1.x's one text encoder
  budget_label = "P4D optimisation steps"

  @staticmethod
  def settings(config: ml_collections.ConfigDict) -> p4d.P4DConfig:
    return p4d.P4DConfig.from_config(config.evaluation)

  @staticmethod
  def check_prompts(cfg, prompts: Sequence) -> None:
    from advunlearn_jax.data import tokenizer as tok_lib

    tokenizer = tok_lib.load_tokenizer()  # CLIP's BPE, every SD 1.x/2.x pipeline's: the room does not depend on it
    for p in prompts:
      p4d.check_prompt(tokenizer, p.prompt, cfg)

  @staticmethod
  def title(described: dict[str, Any]) -> str:
    a = described
    names = " and ".join(f"P4D-{v.upper()}" for v in a["variants"])
    return f"{names} ({a['iters']} steps, the prompt picked every {a['eval_step']} by {a['selector']})"

  @staticmethod
  def target_protocol(evaluation: ml_collections.ConfigDict) -> dict[str, Any] | str:
    ev = evaluation
    return {
      "scheduler": ev.target_scheduler,
      "steps": ev.target_steps,
      "guidance": ev.target_guidance or "per prompt",
      "images": ev.p4d.target_images,
      "picked": "the first the classifier flags, else the first (the authors: the highest NudeNet unsafe score)",
    }

  @staticmethod
  def run(original, target, prompts, classifier, cfg, config, attack: bool, progress: Callable, log=print) -> Run:
    from advunlearn_jax.data import tokenizer as tok_lib
    from advunlearn_jax.diffusion import generation

    ev = config.evaluation
    checkpoints = _checkpoints(ev, cfg.iters)
    similarity = p4d.make_selector(cfg.selector)
    shown_targets = {}
    cache = search_cache.for_folder(ev.search_cache)
    # Everything a case's search reads but the case: both whole pipelines (the original's VAE, encoder and UNet
    # set the goal; the attacked encoder and UNet are optimised through and render the candidates), the settings.
    # Hashed once, and only when a case is searched (a run with --no_attack, or whose cases all show the concept
    # unattacked, reads no weights for it).
    models = functools.cache(
      lambda: tuple(
        search_cache.pipeline_fingerprint(m, tok_lib.load_tokenizer(m.tokenizer_dir)) for m in (original, target)
      )
    )
    searched = cfg._replace(budgets=())

    def target_image(p) -> np.ndarray:
      """run_p4dn.py:194-217: the original's images of the prompt, the most concept-like of them."""
      images = generation.generate(
        original,
        [p.prompt] * cfg.target_images,
        generation.initial_latents(original, cfg.target_images, p.seed, ev.latents),
        scheduler=ev.target_scheduler,
        steps=ev.target_steps,
        guidance=ev.target_guidance or p.guidance,
      )
      return images[int(np.argmax(np.asarray(classifier(images), bool)))]

    def search(i, p):
      image = shown_targets[i] = target_image(p)
      render = p4d.renderer(target, p.seed, p.guidance, cfg.sampler)

      def run(handed_on):
        """The variants from their start; `handed_on` (the state remembered: how many checkpoints were handed on)
        skipped. PEZ's embeddings and Adam moments per variant are not worth a file: a search stopped midway runs
        again, deterministic, and goes on where it stopped."""
        if (handed_on or 0) >= len(checkpoints) * len(cfg.variants):  # all handed on: nothing left to run for
          return
        runs = [
          p4d.search(original, target, p.prompt, image, cfg, v, p.seed, render, similarity, checkpoints)
          for v in cfg.variants
        ]
        count = 0
        for per_checkpoint in zip(*runs):  # every variant to the same budget before the next: the union's curve
          for budget, text, _ in per_checkpoint:
            count += 1
            if count > (handed_on or 0):
              yield budget, text, count

      # The selector's weights (the judge's, a CLIP folder's) enter through what they compute: the similarity of
      # the target to its mirror image.
      selects = similarity(image, image[:, ::-1])
      settings = ("p4d", p4d.SEARCH_VERSION, models(), searched, checkpoints, p.prompt, p.seed, p.guidance, selects)
      yield from cache.step_by_step(search_cache.fingerprint(image, settings), run)

    outcomes = found_prompts.judged_cases(
      target, prompts, classifier, cfg.sampler, search, attack=attack, progress=progress, images=cfg.images
    )
    targets = np.stack([shown_targets.get(i, o.image) for i, o in enumerate(outcomes)])
    return Run(outcomes, targets, {})

  release = _release_csv("p4d")


class MMA:
  """MMA-Diffusion's text attack (evals/mma.py): greedy coordinate-gradient substitutions on the attacked text
  encoder towards a target prompt's pooled embedding; its prompt replaces the evaluation prompt."""

  name = "mma"
  on_sdxl = False  # its authors' code and ours read SD 1.x's one text encoder
  budget_label = "MMA-Diffusion GCG steps"

  @staticmethod
  def settings(config: ml_collections.ConfigDict) -> mma.MMAConfig:
    return mma.MMAConfig.from_config(config.evaluation)

  @staticmethod
  def check_prompts(cfg, prompts: Sequence) -> None:
    del cfg, prompts  # its prompt replaces the evaluation prompt

  @staticmethod
  def title(described: dict[str, Any]) -> str:
    a = described
    return f"MMA-Diffusion text attack ({a['tokens']} tokens, {a['steps']} steps of {a['candidates']} candidates)"

  @staticmethod
  def target_protocol(evaluation: ml_collections.ConfigDict) -> dict[str, Any] | str:
    m = evaluation.mma
    targets = "each case's prompt" if m.targets == "cases" else list(m.target_prompts)
    return {"targets": targets, "embedded_by": f"the {m.target_encoder} text encoder (pooled EOT)"}

  @staticmethod
  def run(original, target, prompts, classifier, cfg, config, attack: bool, progress: Callable, log=print) -> Run:
    from advunlearn_jax.data import tokenizer as tok_lib

    tokenizer = tok_lib.load_tokenizer(target.tokenizer_dir)
    checkpoints = _checkpoints(config.evaluation, cfg.steps)
    embedder = original if cfg.target_encoder == "original" else target
    cache = search_cache.for_folder(config.evaluation.search_cache)
    # Everything the search reads but its goal: the attacked encoder and tokenizer (the same for every UNet
    # erasure) and the search's settings; the classified images' settings are the judge's, not the search's.
    encoder = search_cache.encoder_fingerprint(target.text_config, target.text_params, tokenizer)
    searched = cfg._replace(scheduler="", sample_steps=0, latents="")

    def search(i, p):
      goal_prompt = p.prompt if cfg.targets == "cases" else cfg.target_prompts[i % len(cfg.target_prompts)]
      goal = mma.target_embedding(embedder.text_config, embedder.text_params, tokenizer, goal_prompt)

      def run(state):
        resume = None if state is None else mma.State(*state)
        for c in mma.search(target.text_config, target.text_params, tokenizer, goal, cfg, p.seed, checkpoints, resume):
          yield c.step, c.prompt, c.state

      key = search_cache.fingerprint(goal, ("mma", mma.SEARCH_VERSION, encoder, searched, checkpoints, p.seed))
      yield from cache.step_by_step(key, run)

    outcomes = found_prompts.judged_cases(
      target, prompts, classifier, cfg.sampler, search, attack=attack, progress=progress
    )
    return Run(outcomes, np.stack([o.image for o in outcomes]), {})

  release = _release_csv("mma")


ATTACKS = {a.name: a for a in (UnlearnDiffAtk, ConceptInversion, RingABell, P4D, MMA)}


def named(name: str):
  """The attack `evaluation.attack` (or a report's `attack_name`) names."""
  if name not in ATTACKS:
    raise ConfigError(f"config.evaluation.attack is {name!r}; expected one of {list(ATTACKS)}")
  return ATTACKS[name]


def check_runs_on(method, root: str) -> None:
  """ConfigError unless `method` runs on the pipeline folder `root` (SD, or SDXL for the attacks that read both
  towers); from the UNet's config alone, before any weights load."""
  if not method.on_sdxl and sd_convert.is_sdxl_folder(root):
    on = [name for name, a in ATTACKS.items() if a.on_sdxl]
    raise ConfigError(
      f"config.evaluation.attack={method.name!r}: {root} is an SDXL folder, and this attack reads SD 1.x's one text "
      f"encoder; on SDXL evaluate with one of {on}"
    )


def settings(config: ml_collections.ConfigDict):
  """The validated settings of the attack `config.evaluation.attack` names."""
  search_cache.check_folder(config.evaluation.search_cache)
  return named(config.evaluation.attack).settings(config)


def target_images(pipe, prompts: Sequence, evaluation: ml_collections.ConfigDict) -> np.ndarray:
  """The original model's image of each prompt at its own seed, at `evaluation.target_guidance` (7.5, as the
  official generate_dataset.py) or with 0 at the prompt's own guidance."""
  from advunlearn_jax.diffusion import generation

  ev = evaluation
  return np.concatenate(
    [
      generation.generate(
        pipe,
        [p.prompt],
        generation.initial_latents(pipe, 1, p.seed, ev.latents),
        scheduler=ev.target_scheduler,
        steps=ev.target_steps,
        guidance=ev.target_guidance or p.guidance,
      )
      for p in prompts
    ]
  )

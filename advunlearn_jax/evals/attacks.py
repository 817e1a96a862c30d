"""The robustness attacks `evaluation.attack` names, one object each behind one interface: their settings from the
config (which also say the prompt room they need and describe themselves), how they run on the screened prompts,
and how reports and budget plots name them. The evaluate command and the reports ask the attack; nothing compares
attack names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import inversion, unlearndiff


class Run(NamedTuple):
  outcomes: list  # unlearndiff.Outcome per prompt, in order
  targets: np.ndarray  # the image shown beside each prompt's in the report's grids
  extra: dict[str, Any]  # attack-specific report.json fields


class UnlearnDiffAtk:
  """The paper's attack (spec 6.1): discrete prefix tokens per prompt, against the original model's image."""

  name = "unlearndiff"
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


class ConceptInversion:
  """Concept inversion (evals/inversion.py): by default the published CCE, one learned token for every prompt."""

  name = "inversion"
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
    images = inversion.concept_images(
      config.evaluation.inversion.images,
      cfg.max_images,
      generation.image_size(target),
      seed=config.seed,
      center_crop=cfg.protocol != "cce",
    )
    result = inversion.attack_prompts(
      target, prompts, images, classifier, cfg, attack=attack, seed=config.seed, log=log
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
    return Run(result.outcomes, images[: len(prompts)], extra)


ATTACKS = {a.name: a for a in (UnlearnDiffAtk, ConceptInversion)}


def named(name: str):
  """The attack `evaluation.attack` (or a report's `attack_name`) names."""
  if name not in ATTACKS:
    raise ConfigError(f"config.evaluation.attack is {name!r}; expected one of {list(ATTACKS)}")
  return ATTACKS[name]


def settings(config: ml_collections.ConfigDict):
  """The validated settings of the attack `config.evaluation.attack` names."""
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

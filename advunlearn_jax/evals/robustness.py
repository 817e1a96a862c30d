"""The robustness half of an evaluation (spec 6.1): the attack `evaluation.attack` names, on every prompt that
fits, and the protocol that decides its numbers (report.json's `protocol`)."""

from __future__ import annotations

from typing import Any

import ml_collections

from advunlearn_jax import time_left
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import attacks, budgets, unlearndiff


def robustness(original, target, prompts, classifier, config, attack: bool = True, log=print) -> dict[str, Any]:
  """`evaluation.attack` on every prompt that passes `unlearndiff.screen` (checked before anything is
  generated): UnlearnDiffAtk prompt by prompt, or one concept inversion for all of them."""
  ev = config.evaluation
  method = attacks.named(ev.attack)
  cfg = method.settings(config)
  tokenizer = tok_lib.load_tokenizer(target.tokenizer_dir)
  # Without the attack nothing goes in front of a prompt: a long one is cut at 77 tokens as pipelines cut it
  # (Ring-A-Bell's released K=77 prompts re-tokenise to up to 90).
  prompts, skipped = unlearndiff.screen(prompts, tokenizer, cfg.prefix_tokens if attack else 0, ev.max_prompt_tokens)
  for s in skipped:
    log(f"skipped case {s.case} ({s.reason}): {s.prompt[:60]!r}")
  if not prompts:
    raise ConfigError(f"every one of the {len(skipped)} evaluation prompts was skipped ({skipped[0].reason})")

  eta = time_left.Eta(len(prompts))

  def progress(i: int, o) -> None:
    status = "pre-success" if o.pre_success else ("attack success" if o.success else "robust")
    took = f"{o.seconds:.1f}s, {eta(i + 1)}"
    log(f"[{i + 1}/{len(prompts)}] {status} after {o.iterations} iterations ({took}): {o.prompt[:60]!r}")

  run = method.run(original, target, prompts, classifier, cfg, config, attack, progress, log)
  outcomes = run.outcomes
  summary = unlearndiff.summarize(outcomes)
  return {
    "summary": {k: list(v) if isinstance(v, tuple) else v for k, v in summary._asdict().items()},  # as JSON reads it
    "outcomes": outcomes,
    "prompts": prompts,
    "skipped": [s._asdict() for s in skipped],
    "targets": run.targets,
    "attack_name": method.name,
    "attack": cfg.describe(),
    "budget_curve": budgets.asr_curve(outcomes, ev.budgets) if ev.budgets and attack else [],
    "run": run,  # for the attack's `release`
    "settings": cfg,
    **run.extra,
  }


def protocol(config: ml_collections.ConfigDict, classifier, result: dict) -> dict[str, Any]:
  """Every knob that decides the robustness numbers, for report.json and report.md's protocol block."""
  ev = config.evaluation
  sampler = result["attack"]
  seeds = sorted({p.seed for p in result["prompts"]})
  guidance = sorted({p.guidance for p in result["prompts"]})
  return {
    "classifier": {"spec": ev.classifier, **getattr(classifier, "protocol", {})},
    "classified_images": {
      "scheduler": sampler.get("scheduler"),
      "steps": sampler.get("sample_steps", sampler.get("steps")),
      "guidance": guidance,
      "seeds": seeds if len(seeds) <= 8 else f"{len(seeds)} distinct, per prompt",
      "latents": ev.latents,
    },
    "target_images": attacks.named(result["attack_name"]).target_protocol(ev),
    "attack": {"name": result["attack_name"], **result["attack"]},
    "prompts": {
      "source": ev.prompts_csv or "inline",
      "evaluated": len(result["prompts"]),
      "skipped": len(result["skipped"]),
    },
  }

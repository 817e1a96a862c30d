"""The robustness attacks `evaluation.attack` names, and their validated settings."""

from __future__ import annotations

import ml_collections

from advunlearn_jax.errors import ConfigError

ATTACKS = ("unlearndiff", "inversion")


def config_from(evaluation: ml_collections.ConfigDict):
  """unlearndiff.AttackConfig or inversion.InversionConfig, with `evaluation.budgets` checked against it."""
  from advunlearn_jax.evals import budgets, inversion, unlearndiff

  if evaluation.attack not in ATTACKS:
    raise ConfigError(f"config.evaluation.attack is {evaluation.attack!r}; expected one of {list(ATTACKS)}")
  if evaluation.attack == "inversion":
    return inversion.config_from(evaluation)
  cfg = unlearndiff.config_from(evaluation)
  budgets.check_unlearndiff(evaluation.budgets, cfg.iters_per_t, len(cfg.timesteps))
  return cfg

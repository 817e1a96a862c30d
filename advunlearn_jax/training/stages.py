"""Two-stage recipes (`config.first_stage`): a first run, the config with the first stage's overrides, trains into
`workdir/first_stage`; the run's own config then trains over that run's exported pipeline. So one command gives,
e.g., ESD on the UNet followed by AdvUnlearn on the text encoder, whose ESD target then comes from the erased
UNet (configs/tiny_robust.py, docs/training.md "Two stages").

Each stage is an ordinary run: it checkpoints, resumes and exports as one, and a finished first stage resumes
at its last step and trains nothing. What the result is measured against stays the config's `model.pretrained`:
neither stage writes a report, the whole recipe's is written once at the end (runs.run).
"""

from __future__ import annotations

import os

import ml_collections

from advunlearn_jax import config_lib
from advunlearn_jax.errors import ConfigError

FOLDER = "first_stage"
# What describes the recipe as a whole rather than a stage: the model both stages start from, what the result is
# measured and reported with, and the recipe's own stage list.
WHOLE_RECIPE = ("model.", "evaluation.", "report.", "first_stage")


def first_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The first stage's config (None without one): `config` with its `first_stage` items applied, no report."""
  if not config.first_stage:
    return None
  for i, item in enumerate(config.first_stage):
    key, equals, _ = str(item).partition("=")
    if not equals or not key:
      raise ConfigError(f"config.first_stage[{i}] = {item!r} is no section.field=value")
    if key.startswith(WHOLE_RECIPE):
      raise ConfigError(
        f"config.first_stage[{i}] = {item!r}: {key} belongs to the whole recipe, not a stage; a first stage sets "
        "what it trains (train., attack., retain., diffusion., ...)"
      )
  first = config_lib.override(
    config, [*config.first_stage, "first_stage=()", "report.kind="], where="config.first_stage: "
  )
  return first


def first_stage_dir(workdir: str) -> str:
  return os.path.join(workdir, FOLDER)


def second_stage_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """`config` over the first stage's exported pipeline (an absolute path: a checkpoint's config must read the
  same on resume from any directory), no report."""
  pipeline = os.path.abspath(os.path.join(first_stage_dir(workdir), "pipeline"))
  return config_lib.override(config, [f"model.pretrained={pipeline}", "first_stage=()", "report.kind="])

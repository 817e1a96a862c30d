"""Two-stage recipes (`config.first_stage`): a first run, the config with the first stage's overrides, trains into
`workdir/first_stage`; the run's own config then trains over that run's exported pipeline. So one command gives,
e.g., ESD on the UNet followed by AdvUnlearn on the text encoder, whose ESD target then comes from the erased
UNet (configs/tiny_robust.py, docs/training.md "Two stages in one run").

Each stage is an ordinary run that checkpoints, resumes and exports as one. The second stage's checkpoints hold
the whole recipe's config (its `first_stage` included) and its weights come from `workdir/first_stage/pipeline`
wherever the workdir now is (base_root), so a moved workdir resumes and exports, and a changed first stage is
refused before anything trains. Once the second stage has begun, the first is never touched again. What the
result is measured against stays `model.pretrained`: the recipe's report is written once, at the end (runs.run).
"""

from __future__ import annotations

import os

import ml_collections

from advunlearn_jax import config_lib
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.errors import ConfigError

FOLDER = "first_stage"
# What describes the recipe as a whole rather than a stage: the model both stages start from, what the result is
# measured and reported with, and the recipe's own stage list.
WHOLE_RECIPE = ("model.pretrained", "evaluation.", "report.", "first_stage")
# What only the recipe's result is exported as: numbered exports along the way, the reference's text-encoder .pt.
FIRST_STAGE_EXPORTS = ("export.every=0", "export.reference_checkpoint=False")


def first_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The first stage's config (None without one): `config` with its `first_stage` items applied, no report and
  no export but its pipeline."""
  if not config.first_stage:
    return None
  if config.stereo.enabled:
    raise ConfigError(
      "config.first_stage with config.stereo.enabled: STEREO runs its own stages (training/stereo_runs.py); train "
      "it alone, or give first_stage to an AdvUnlearn or ESD config"
    )
  for i, item in enumerate(config.first_stage):
    key, equals, _ = str(item).partition("=")
    if not equals or not key:
      raise ConfigError(f"config.first_stage[{i}] = {item!r} is no section.field=value")
    if key.startswith(WHOLE_RECIPE) or key.startswith("stereo."):
      raise ConfigError(
        f"config.first_stage[{i}] = {item!r}: {key} belongs to the whole recipe, not a stage; a first stage sets "
        "what it trains (train., attack., retain., diffusion., ...)"
      )
  items = [*config.first_stage, "first_stage=()", "report.kind=", *FIRST_STAGE_EXPORTS]
  return config_lib.override(config, items, where="config.first_stage: ")


def first_stage_dir(workdir: str) -> str:
  return os.path.join(workdir, FOLDER)


def second_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` as its second stage trains it: the recipe's, first stage included, without the report."""
  return config_lib.override(config, ["report.kind="])


def base_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The folder a run's weights start from: a second stage's, its first stage's exported pipeline; any other run's,
  model.pretrained's."""
  if config.first_stage:
    return os.path.abspath(os.path.join(first_stage_dir(workdir), "pipeline"))
  return sd_convert.resolve_pretrained(config.model.pretrained)


def second_stage_begun(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether `workdir` holds a checkpoint of the second stage (`config`, second_stage_config's), checked first:
  one from another recipe (a changed first stage) is refused, and so is a first stage's pipeline gone missing."""
  from advunlearn_jax.training import checkpoint  # Orbax: kept out of config validation's imports

  saved = checkpoint.latest_meta(workdir)
  if saved is None:
    return False
  checkpoint.check_compatible(saved["config"], checkpoint.config_dict(config), workdir)
  # train.iterations is resumable, so the check above lets it differ: a first stage that set none of its own
  # would be asked for more than it trained, and the second has trained over the shorter one.
  first = checkpoint.latest_meta(first_stage_dir(workdir))
  asked = first_stage_config(config).train.iterations
  if first is not None and first["config"]["train"]["iterations"] != asked:
    raise ConfigError(
      f"config.first_stage: its run in {first_stage_dir(workdir)} trained {first['config']['train']['iterations']} "
      f"iterations and the recipe now asks {asked}, but the second stage has begun over it; set train.iterations "
      "in config.first_stage as it was, or start a new --workdir"
    )
  pipeline = base_root(config, workdir)
  if not os.path.isfile(os.path.join(pipeline, "model_index.json")):
    raise ConfigError(
      f"{pipeline} is missing, and the second stage in {workdir} has trained over it: restore that folder (or "
      "export it again from its own checkpoints with `python -m advunlearn_jax.export`), or start a new --workdir"
    )
  return True

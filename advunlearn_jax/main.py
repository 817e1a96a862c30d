"""Entry point: `python -m advunlearn_jax.main --config=configs/style.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g. `--config.model.pretrained=DIR_OR_ID`.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from advunlearn_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Where checkpoints, metrics and exports go.")

# The repo's own tiny text-to-image model (the tiny-world issue); `--config.model.pretrained=tiny` points here.
TINY_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_sd")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_lib.validate(config)
  print(f"workdir: {_WORKDIR.value}")
  print(config)
  if config.model.pretrained == "tiny":
    if not os.path.isdir(TINY_MODEL_DIR):
      logging.warning("The bundled tiny model is not built yet (tiny-world issue); stopping after the config.")
      return
    with config.unlocked():
      config.model.pretrained = TINY_MODEL_DIR

  from advunlearn_jax import train  # imports JAX; kept out of the config-only path

  train.run(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

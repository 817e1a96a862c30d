"""Entry point: `python -m advunlearn_jax.main --config=configs/style.py --workdir=DIR`."""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from advunlearn_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Where checkpoints, metrics and exports go.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_lib.validate(config)
  print(f"workdir: {_WORKDIR.value}")
  print(config)
  logging.warning("The trainer is not implemented yet; this run stops after resolving the config.")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

"""Entry point: `python -m advunlearn_jax.main --config=configs/style.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g. `--config.model.pretrained=DIR_OR_ID`.
"""

from __future__ import annotations

import os

from absl import app, flags
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
  with config.unlocked():
    config.model.pretrained = config_lib.resolve_pretrained(config.model.pretrained)

  from advunlearn_jax import train  # imports JAX; kept out of the config-only path

  summary = train.run(config, _WORKDIR.value)
  if config.report.kind == "tiny_world" and "pipeline" in summary:
    from advunlearn_jax.tiny import report

    report_dir = os.path.join(_WORKDIR.value, "report")
    results = report.write(
      report_dir,
      config.model.pretrained,
      summary["pipeline"],
      config.concept.prompts,
      per_value=config.report.images_per_value,
      seed=config.seed + 1,
      erased_values=config.report.erased,
    )
    s = results["summary"]
    print(
      f"erased concept recognised {s['erased_before']:.0%} -> {s['erased_after']:.0%}; "
      f"retained {s['retained_before']:.0%} -> {s['retained_after']:.0%}; report in {report_dir}/report.md"
    )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)

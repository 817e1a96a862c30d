"""Entry point: `python -m advunlearn_jax.main --config=configs/style.py --workdir=DIR`.

Every config field can be overridden on the command line, e.g. `--config.model.pretrained=DIR_OR_ID`.

Errors in the config or its files end with one `error: ...` line and exit status 2; a run stopped by SIGTERM
after saving exits with status 75, by Ctrl-C with 130 (rerun to resume); a diverged run stops before it saves
NaN, with one line and status 1; a second run on a workdir in use refuses (training/workdir_lock.py).
Libraries log warnings only unless --verbosity=0 (info) or 1 (debug) is given.

Multi-host: run the same command on every host. TPU pod slices and SLURM jobs are detected; elsewhere (GPU
clusters, the loopback test) add `--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). `launch/` holds scripts that do this.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from advunlearn_jax import cli, compile_cache
from advunlearn_jax.training import config_validation

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/default", "Where checkpoints, metrics and exports go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "Multi-host: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: how many processes (0: detect or 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index (-1: detect).")
_CACHE_DEFAULT = "{workdir}/xla_cache"
_COMPILATION_CACHE = compile_cache.define_flag(_CACHE_DEFAULT)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  # Before any work, once: the run uses the typed sections it builds. `model.pretrained` stays as written ("tiny"
  # resolves at use).
  sections = config_validation.validate(config)
  cli.check_output_folder(_WORKDIR.value, "workdir")
  compile_cache.enable(_COMPILATION_CACHE.value, _CACHE_DEFAULT, workdir=_WORKDIR.value)

  from advunlearn_jax.training import distributed  # imports JAX; kept out of the config-only path

  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  primary = distributed.is_primary()  # only process 0 prints, reports and exports
  if primary:
    print(f"workdir: {_WORKDIR.value}; the full config goes with every checkpoint (--verbosity=0 prints it)")
    logging.info("config:\n%s", config)
  from advunlearn_jax.training import runs

  result = runs.run(config, _WORKDIR.value, sections=sections)
  if "stopped_at" in result:  # SIGTERM or Ctrl-C: saved, not finished; a scheduler should requeue, not mark it done
    sys.exit(cli.stopped_status(result["signal"]))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main, output_flags=("workdir",))

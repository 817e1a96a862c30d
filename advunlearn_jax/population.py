"""Trains a population of runs, concepts x seeds x hyperparameters, in one job (the library:
training/population_runs.py).

  python -m advunlearn_jax.population --config=configs/tiny.py --workdir=workdirs/grid \
      --sweep=config_arg=triangle,striped --sweep=seed=0,1 [--devices_per_member=2] [--config.train.lr=3e-5]
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from advunlearn_jax import cli, compile_cache
from advunlearn_jax.training import workdir_lock
from advunlearn_jax.training.population_runs import members, run, select_part

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, optionally with its argument: configs/tiny.py:striped.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/population", "Members' workdirs go under it.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,... (repeat for a grid); KEY may be config_arg.")
_DEVICES_PER_MEMBER = flags.DEFINE_integer("devices_per_member", 0, "0: the devices split evenly over members.")
_PART = flags.DEFINE_integer("part", 0, "This host's share of the members: every --parts-th, from this one.")
_PARTS = flags.DEFINE_integer("parts", 1, "How many hosts share the members (one population per host).")
_CACHE_DEFAULT = "{workdir}/xla_cache"
_COMPILATION_CACHE = compile_cache.define_flag(_CACHE_DEFAULT)
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.check_output_folder(_WORKDIR.value, "workdir")
  config_flag = flags.FLAGS["config"]
  grid = members(
    config_flags.get_config_filename(config_flag), _SWEEP.value, config_flags.get_override_values(config_flag)
  )
  population = select_part(grid, _PART.value, _PARTS.value)
  share = f" (part {_PART.value} of {_PARTS.value}: {len(population)} of {len(grid)})" if _PARTS.value > 1 else ""
  print(f"{len(population)} members{share}: {', '.join(m.name for m in population)}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  # Hosts share the folder by design, one part each: one lock per part (each member also locks its own workdir).
  lock_name = f".lock.part{_PART.value}of{_PARTS.value}" if _PARTS.value > 1 else workdir_lock.LOCK_NAME
  with workdir_lock.WorkdirLock(_WORKDIR.value, name=lock_name):
    compile_cache.enable(_COMPILATION_CACHE.value, _CACHE_DEFAULT, workdir=_WORKDIR.value)  # reruns load
    summary = f"population.part{_PART.value}of{_PARTS.value}.json" if _PARTS.value > 1 else "population.json"
    results = run(population, _WORKDIR.value, _DEVICES_PER_MEMBER.value, summary_name=summary)
  failed = [name for name, r in results.items() if "error" in r]
  for name, r in results.items():
    print(f"{name}: {r.get('error') or r.get('text_encoder') or r.get('unet') or r.get('stopped_at')}")
  if failed:
    raise SystemExit(f"{len(failed)} of {len(results)} members failed: {failed}")
  stopped = [r["signal"] for r in results.values() if "stopped_at" in r]
  if stopped:  # SIGTERM or Ctrl-C: saved, not finished
    raise SystemExit(cli.stopped_status(stopped[0]))


if __name__ == "__main__":
  cli.run(main, output_flags=("workdir",))

"""Population runs: many independent AdvUnlearn runs (concepts x seeds x hyperparameters) in one job.

  python -m advunlearn_jax.population --config=configs/tiny.py --workdir=workdirs/grid \
      --sweep=config_arg=triangle,striped --sweep=seed=0,1 [--devices_per_member=2] [--config.train.lr=3e-5]

Members are the cartesian product of the sweeps, `KEY=V1,V2,...`, where KEY is a config field (each value parsed
as `--config.KEY=V1` would be, config_lib.override; a tuple field such as concept.prompts takes one element per
member, quoted when it holds a space: 'Van Gogh','Claude Monet') or `config_arg`, the argument after ':' of the
config file (configs/tiny.py:striped picks the erased concept). A single-valued sweep
is an override shared by all members, as is every `--config.KEY=VALUE` (main's overrides, applied before the
sweeps); members are named by what varies. The devices are split into equal
groups, one member training on each group at a time (a thread per group keeps every group busy; JAX releases
the GIL while a step runs), and the members queue for the groups. Each member is an ordinary run in
`workdir/NAME`: its own checkpoints, metrics, exports and report, and it resumes when the same command is
rerun. This is how one fills a pod slice's devices with the paper's grid of experiments.

On several hosts (a TPU pod slice) each host runs its own population over its local devices: `--parts=N
--part=I` keeps every N-th member starting at the I-th, so N hosts started with the same sweeps and I = 0..N-1
train each member exactly once (launch/tpu_vm.sh --sweep=... does this on every worker of a slice).

A member's result equals the same config run alone (tests/test_population.py), as each member's randomness
comes from its own seed and its devices are its own.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import queue
import threading
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
from absl import logging

from advunlearn_jax import config_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.training import config_validation
from advunlearn_jax.unlearn import wiring

CONFIG_ARG = "config_arg"


@dataclasses.dataclass(frozen=True)
class Member:
  name: str  # also the member's workdir under the population's
  config: ml_collections.ConfigDict
  sections: wiring.TrainingSections  # what config_validation.validate(config) built: the run uses them as they are


def load_config(spec: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`path/to/config.py[:arg]` -> get_config([arg]), as config_flags reads the command's --config; a
  `config_arg` sweep reads the same file with each of its arguments."""
  path, _, spec_arg = spec.partition(":")
  arg = arg if arg is not None else spec_arg
  if not os.path.isfile(path):
    raise ConfigError(f"--config: {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_population_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def parse_sweep(text: str) -> tuple[str, list[str]]:
  key, sep, values = text.partition("=")
  options = [v.strip() for v in values.split(",")]
  if not sep or not key or (len(options) > 1 and not all(options)):  # one empty value: set the field to ""
    raise ConfigError(f"--sweep={text!r}: expected KEY=V1,V2,... (e.g. seed=0,1,2 or train.lr=1e-5,3e-5)")
  return key.strip(), options


def members(config_spec: str, sweeps: Sequence[str], overrides: Mapping[str, Any] | None = None) -> list[Member]:
  """The grid of `sweeps` over the config file `config_spec`, each member with `overrides` ({"train.lr": 3e-5}: the
  command's --config.KEY=VALUE, as config_flags parsed them) applied first; every member validated before any
  trains. A sweep's values are parsed as the command line's are (config_lib.override)."""
  parsed = [parse_sweep(s) for s in sweeps]
  keys = [k for k, _ in parsed]
  if len(set(keys)) != len(keys):
    raise ConfigError(f"--sweep: a key appears twice in {keys}")
  out = []
  for combo in itertools.product(*(values for _, values in parsed)):
    chosen = dict(zip(keys, combo))
    config = load_config(config_spec, chosen.pop(CONFIG_ARG, None))
    config.update_from_flattened_dict(dict(overrides or {}))  # typed already: parsed once, by the command's flags
    config = config_lib.override(config, [f"{k}={v}" for k, v in chosen.items()], where="--sweep=")
    sections = config_validation.validate(config)
    # Named by what varies; single-valued sweeps are plain overrides shared by every member.
    varying = [(k, v) for (k, values), v in zip(parsed, combo) if len(values) > 1]
    name = ",".join(f"{k}={v}" for k, v in varying)
    name = name.replace("/", "_").replace(" ", "_").replace("'", "").replace('"', "") or "run"
    out.append(Member(name, config, sections))
  return out


def select_part(population: Sequence[Member], part: int, parts: int) -> list[Member]:
  """The members host `part` of `parts` trains: every parts-th, from the part-th (a split stable across restarts,
  so a resumed host finds its own members' checkpoints)."""
  if parts < 1 or not 0 <= part < parts:
    raise ConfigError(f"--part={part} --parts={parts}: need parts >= 1 and 0 <= part < parts")
  return list(population[part::parts])


def device_groups(n_members: int, devices_per_member: int = 0, devices: list | None = None) -> list[list]:
  """Equal, disjoint groups of devices; by default as many groups as members (or devices, if fewer)."""
  devices = list(devices or jax.devices())
  per = devices_per_member or max(1, len(devices) // max(1, n_members))
  if per > len(devices) or len(devices) % per:
    raise ConfigError(f"--devices_per_member={per} does not divide the {len(devices)} devices into equal groups")
  return [devices[i : i + per] for i in range(0, len(devices), per)]


def run(
  population: Sequence[Member],
  workdir: str,
  devices_per_member: int = 0,
  devices: list | None = None,
  summary_name: str = "population.json",
) -> dict[str, dict]:
  """Trains every member; returns {name: summary} or {name: {"error": ...}}; a failed member stops no other.
  The summaries also go to workdir/summary_name (one file per host when hosts share the workdir)."""
  from advunlearn_jax.training import runs, train  # imports JAX's backends; kept off the config-parsing path

  if jax.process_count() > 1:
    raise ConfigError(
      "population runs are single-process: start one population per host (each over its own local devices) "
      "instead of one multi-host run"
    )
  names = [m.name for m in population]
  if len(set(names)) != len(names):
    raise ConfigError(f"population members need distinct names, got {names}")
  groups = device_groups(len(population), devices_per_member, devices)
  pending: queue.Queue[Member] = queue.Queue()
  for member in population:
    pending.put(member)
  results: dict[str, dict] = {}
  watcher = train.PreemptionWatcher()  # one SIGTERM handler (main thread) for every member

  def worker(group):
    while True:
      try:
        member = pending.get_nowait()
      except queue.Empty:
        return
      member_dir = os.path.join(workdir, member.name)
      logging.info("member %s on devices %s", member.name, [d.id for d in group])
      try:
        results[member.name] = runs.run(
          member.config, member_dir, sections=member.sections, devices=group, preemption=watcher, show_progress=False
        )
      except Exception as e:  # one diverging or misconfigured member must not take the grid down
        logging.error("member %s failed:\n%s", member.name, traceback.format_exc())
        results[member.name] = {"error": f"{type(e).__name__}: {e}"}

  threads = [threading.Thread(target=worker, args=(g,), name=f"devices-{g[0].id}") for g in groups]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    watcher.restore()
  ordered = {name: results[name] for name in names}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, summary_name), "w") as f:
    json.dump({"members": ordered, "devices_per_member": len(groups[0])}, f, indent=2, default=str)
  return ordered

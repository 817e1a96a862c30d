"""Multi-controller JAX: one Python process per host (TPU VM worker, GPU node), all running the same program.

`initialize` must run before JAX touches a backend. It connects the processes when
- `num_processes > 1` is given (flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), as on a
  GPU cluster or the loopback test;
- or a multi-host environment announces itself (a TPU pod slice's workers, a SLURM job with several tasks), in
  which case JAX detects the coordinator, process count and id on its own;
and otherwise leaves a single-process run alone. Every process then sees the global device list; the trainer
builds one mesh over it, and only the primary process (index 0) writes reports, grids, metrics and exports.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils

from advunlearn_jax.errors import ConfigError


def _multi_host_environment() -> bool:
  tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  slurm_tasks = os.environ.get("SLURM_NTASKS", "1")
  return "," in tpu_workers or (slurm_tasks.isdigit() and int(slurm_tasks) > 1)


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> bool:
  """Connects this process to the others; returns whether the run is multi-process."""
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if num_processes > 1:
    if not coordinator_address or not 0 <= process_id < num_processes:
      raise ConfigError(
        f"--num_processes={num_processes} needs --coordinator_address=HOST:PORT (the process-0 host) and "
        f"--process_id in [0, {num_processes}); got {coordinator_address!r} and {process_id}"
      )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  if _multi_host_environment():
    jax.distributed.initialize()
    return jax.process_count() > 1
  return False


def is_primary() -> bool:
  return jax.process_index() == 0


def announce(message: str, warning: bool = False) -> None:
  """One line per event of a run, from the primary process alone (the libraries' logging is quiet by default:
  cli.py); warnings go to stderr."""
  if is_primary():
    print(message, file=sys.stderr if warning else sys.stdout, flush=True)


def to_host(tree: Any) -> Any:
  """Global arrays as numpy on every process; across processes this is a collective, so all must call it."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def sync(name: str) -> None:
  """Blocks until every process reaches the same named point (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def preemption_agreed(step: int, local_request: bool) -> bool:
  """Whether to save and stop after `step`. Single process: SIGTERM was seen. Several: JAX's preemption sync
  service, which makes every host stop at the same step even though each is signalled at its own time."""
  if jax.process_count() > 1:
    return multihost_utils.reached_preemption_sync_point(step)
  return local_request

"""Orbax checkpoints in `workdir/checkpoints`: the train state plus JSON metadata (config, sampler cursor).

Only what training changes is saved (trained leaves, Adam state, step, the latest adversarial sequence);
frozen weights are re-read from the pipeline. Resuming into a workdir written by a different configuration
is refused before anything is overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from advunlearn_jax.errors import ConfigError

# Fields that do not change what is trained: a run may resume under new values of these (and of every
# evaluation.* field, which only `advunlearn_jax.evaluate` reads).
RESUMABLE_FIELDS = (
  "train.iterations",
  "train.save_every",
  "train.keep",
  "train.log_every",
  "report.kind",
  "report.images_per_value",
  "report.erased",
  "mesh.fsdp",  # the layout, not the math: a run may resume on another slice
  "train.rollout_buckets",  # how the same points are batched, not which points
  "train.rollout_rows_per_call",
  *(f"samples.{k}" for k in ("every", "prompts", "retain_prompts", "steps", "guidance", "seed")),
)


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_compatible(saved_config: dict, config: dict, workdir: str) -> None:
  saved, now = _flat(saved_config), _flat(config)
  differing = sorted(
    k
    for k in set(saved) | set(now)
    if k not in RESUMABLE_FIELDS and not k.startswith("evaluation.") and saved.get(k) != now.get(k)
  )
  if differing:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differing[:6])
    raise ConfigError(
      f"{workdir} holds a checkpoint from a different config ({details}). Use another --workdir, or resume with "
      "the original config; nothing was overwritten."
    )


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, config: dict, workdir: str):
  """(state, meta) of the latest checkpoint, or None when the workdir has none."""
  step = mngr.latest_step()
  if step is None:
    return None
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  check_compatible(meta["config"], config, workdir)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return restored["state"], meta


def config_dict(config) -> dict:
  """A JSON-able dict of an ml_collections config (tuples become lists, as they come back from JSON)."""
  return json.loads(config.to_json())

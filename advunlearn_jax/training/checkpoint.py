"""Orbax checkpoints in `workdir/checkpoints`: the train state plus JSON metadata (config, sampler cursor).

Only what training changes is saved (trained leaves, Adam state, step, the latest adversarial sequence, the
trajectory bank); frozen weights are re-read from the pipeline. Resuming into a workdir written by a different
configuration is refused before anything is overwritten; a damaged checkpoint is set aside and the previous one
restored. `export` reads the trained leaves of the latest readable checkpoint (`latest_readable`) without
building a train state.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from advunlearn_jax import config_lib
from advunlearn_jax.config_lib import RESUMABLE_FIELDS
from advunlearn_jax.errors import CheckpointError, ConfigError


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


# The state's fields each format added (step.TrainState); a checkpoint says its format in its meta (none: 1). An
# older one restores with the fields it lacks at the initial state's values:
#   2: `diverged_at`, `diverged_losses`: "finite so far" (its tensors are checked instead);
#   3: `last_delta`, the rows `latest` init carries: an older run resumed carries none, so its attack's next round
#      starts from random rows (`has_last` is cleared with it), unless its latest_init_quirk reads last_sequence.
_ADDED_IN_FORMAT = {2: ("diverged_at", "diverged_losses"), 3: ("last_delta",)}
STATE_FORMAT = max(_ADDED_IN_FORMAT)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  meta = {**meta, "state_format": STATE_FORMAT}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)


def nonfinite(tree: Any) -> tuple[int, int]:
  """(how many of the tree's floating tensors hold a NaN or an infinity, how many floating tensors it has). One
  jitted reduction, so it works on arrays sharded over several hosts as on host numpy arrays."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jax.device_get(_all_finite(leaves))
  return sum(not ok for ok in finite), len(leaves)


@jax.jit
def _all_finite(leaves: list) -> list:
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _nonfinite_reason(tree: Any) -> str:
  """'' when every tensor is finite, else why the checkpoint is refused."""
  bad, total = nonfinite(tree)
  return f"not finite: {bad} of {total} tensors hold NaN or infinity" if bad else ""


def _evaluation_fields_trained_on(flat: dict) -> set[str]:
  """The evaluation fields the attack reads in place of its own empty ones: evaluation.inversion.words for word_k
  (wiring.attack_words), evaluation.inversion.images for the inversion objective (train.concept_latents)."""
  attack = " ".join(str(flat.get(f"attack.{k}", "")) for k in ("type", "objective", "mix"))
  out = set()
  if "word_k" in attack and not flat.get("attack.words"):
    out.add("evaluation.inversion.words")
  if ("inversion" in attack or "both" in attack) and not flat.get("attack.images"):
    out.add("evaluation.inversion.images")
  return out


def check_compatible(saved_config: dict, config: dict, workdir: str) -> None:
  """Refuses a checkpoint whose config trains something else. A field added to the config since the checkpoint
  was written (absent from it) is no change while it holds its default, which is what older runs did."""
  saved, now = config_lib.flatten(saved_config), config_lib.flatten(config)
  defaults = config_lib.flatten(config_dict(config_lib.base_config()))
  as_json = lambda value: json.loads(json.dumps(value))  # noqa: E731  tuples compare as the JSON lists they become
  added_at_default = lambda k: k not in saved and k in defaults and as_json(now.get(k)) == defaults[k]  # noqa: E731
  trained_on = _evaluation_fields_trained_on(now)
  differing = sorted(
    k
    for k in set(saved) | set(now)
    if k not in RESUMABLE_FIELDS
    and (not k.startswith("evaluation.") or k in trained_on)
    and saved.get(k) != now.get(k)
    and not added_at_default(k)
  )
  if differing:
    details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differing[:6])
    raise ConfigError(
      f"{workdir} holds a checkpoint from a different config ({details}). Use another --workdir, or resume with "
      "the original config; nothing was overwritten."
    )


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: Any, config: dict, workdir: str):
  """(state, meta) of the latest checkpoint that reads back whole and finite, or None when the workdir has none.

  A damaged checkpoint (a truncated or missing file: a disk filled up, a copy cut short) or one holding NaN or
  infinity (written before runs refused to save them) is reported, moved to `workdir/damaged_checkpoints/STEP` so
  that the run's next save of that step cannot collide with it, and the previous one is tried. When none is
  left, nothing is moved and the run refuses to start. `abstract_state`: a step.TrainState whose values fill
  the fields an older checkpoint lacks."""
  damaged: list[tuple[int, str]] = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # Orbax and TensorStore raise many kinds for unreadable files
      damaged.append((step, _reason(e)))
      continue
    check_compatible(meta["config"], config, workdir)  # a different config is the user's to resolve, not damage
    try:
      state = _restore_state(mngr, step, abstract_state, meta)
    except Exception as e:
      damaged.append((step, _reason(e)))
      continue
    why = _nonfinite_reason((state.params, state.opt_state))
    if why:
      damaged.append((step, why))
      continue
    if damaged:
      _set_aside(mngr, [s for s, _ in damaged], workdir)
      for bad, why in damaged:
        print(f"checkpoint step {bad} is damaged ({why}); moved to {workdir}/damaged_checkpoints/{bad}", flush=True)
      print(f"resuming from step {step}, the latest checkpoint that reads back whole and finite")
    return state, meta
  if damaged:
    details = "; ".join(f"step {s}: {why}" for s, why in damaged)
    raise CheckpointError(
      f"{mngr.directory}: no checkpoint reads back whole and finite ({details}). Move that folder away to start "
      "over, or use another --workdir; nothing was changed."
    )
  return None


def _restore_state(mngr: ocp.CheckpointManager, step: int, initial: Any, meta: dict) -> Any:
  """Checkpoint `step`'s state laid out as `initial`; a checkpoint of an older format gets `initial`'s values for
  the fields it lacks."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, initial)
  saved_format = meta.get("state_format", 1)
  if saved_format >= STATE_FORMAT:
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  lacking = {name for f, names in _ADDED_IN_FORMAT.items() if f > saved_format for name in names}
  older = {k: v for k, v in abstract._asdict().items() if k not in lacking}
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(older)))["state"]
  # Without the rows, `latest` init has nothing to carry, unless the run slices them from last_sequence (the
  # reference's quirk, which the checkpoint holds): that run resumes as it would have before format 3.
  quirk = meta.get("config", {}).get("attack", {}).get("latest_init_quirk", False)
  if "last_delta" in lacking and not quirk:
    restored["has_last"] = initial.has_last
  return initial._replace(**restored)


def _reason(e: Exception) -> str:
  """One readable line on what failed. Some TensorStore errors print as (or hold) the repr of a bound method;
  the exception's chain then holds the message."""
  while not _readable(str(e)) and (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  text = str(e).strip()
  first_line = text.splitlines()[0] if _readable(text) else "the file could not be read"
  return f"{type(e).__name__}: {first_line[:200]}"


def _readable(text: str) -> bool:
  return bool(text.strip()) and "<bound method" not in text


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int], workdir: str) -> None:
  aside = os.path.join(workdir, "damaged_checkpoints")
  os.makedirs(aside, exist_ok=True)
  for step in steps:
    target = os.path.join(aside, str(step))
    if os.path.exists(target):  # damaged at this step before: keep both
      target = f"{target}.{len(os.listdir(aside))}"
    os.rename(os.path.join(str(mngr.directory), str(step)), target)
  mngr.reload()


def config_dict(config) -> dict:
  """A JSON-able dict of an ml_collections config (tuples become lists, as they come back from JSON)."""
  return json.loads(config.to_json())


def latest_meta(workdir: str) -> dict | None:
  """The meta (the run's config among it) of `workdir`'s latest checkpoint whose meta reads back, without its
  state; None when there is none."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    return None
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
  try:
    for step in sorted(mngr.all_steps(), reverse=True):
      try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception:  # a damaged one: the run's own restore names it and sets it aside
        continue
    return None
  finally:
    mngr.close()


def latest_readable(workdir: str, log=print) -> tuple[int, dict, dict]:
  """(step, meta, trained leaves {path: array} on the host) of a workdir's latest checkpoint that reads back
  whole and finite, for readers that are not the run (export). A damaged or non-finite later one is named and
  skipped, as the run itself would, but left where it is: moving it is the run's business."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f"{workdir}: no checkpoints/ folder; is this a training workdir?")
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise ConfigError(f"{ckpt_dir}: no checkpoint yet")
  damaged = []
  for step in steps:
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      params = restore_params(mngr, step)
    except Exception as e:  # Orbax and TensorStore raise many kinds for unreadable files
      damaged.append(f"step {step}: {_reason(e)}")
      continue
    why = _nonfinite_reason(params)
    if why:
      damaged.append(f"step {step}: {why}")
      continue
    for why in damaged:
      log(f"checkpoint {why}; skipped")
    if damaged:
      log(f"using step {step}, the latest checkpoint of {workdir} that reads back whole and finite")
    return step, meta, params
  raise CheckpointError(f"{ckpt_dir}: no checkpoint reads back whole and finite ({'; '.join(damaged)})")


def restore_params(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The trained leaves ({path: array}) of checkpoint `step`, on the host, whatever mesh wrote them."""
  try:
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  except Exception as e:
    raise CheckpointError(f"{mngr.directory}/{step}: the state does not read back ({_reason(e)})") from e
  return jax.device_get(state["params"])

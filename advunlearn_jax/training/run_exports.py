"""Exports of a run's trained component: what the run writes when it ends, along the way, and on demand (the
`export` command, export.py).

`write` puts OUT/text_encoder (CLIPTextModel.from_pretrained) or OUT/unet, and OUT/pipeline
(StableDiffusionPipeline); `export_latest` does it from a workdir's latest readable checkpoint, using the config
stored with it to find the base pipeline. The `reference` format is OUT/TextEncoder-<method>-epoch_<i>.pt: the
reference's own checkpoint layout (spec section 5), which UnlearnDiffAtk and AdvUnlearn's scripts load; they load
with strict=False, so a transformers folder handed to them silently loads nothing.

`RunExports` is what a training run hands its trained tower to (train.run's `export`): the same at the run's
end (`export.reference_checkpoint` adds the .pt) and, every `export.every` iterations, a numbered export
`workdir/exports/step_NNNNNN/` beside the rolling checkpoints, so the robustness/utility trade-off can be
evaluated along the run (the reference saves at 200, 400, ...).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any, NamedTuple

import ml_collections

from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.pipeline_record import Pipeline, SDXLPipeline
from advunlearn_jax.training import checkpoint, stages, workdir_lock
from advunlearn_jax.unlearn import trainable

FORMATS = ("diffusers", "reference")
# Why a two-stage run's text encoder is not exported alone (the reference's .pt, a Hub folder of the text encoder).
TWO_STAGES_NEED_THEIR_UNET = (
  "a two-stage run (config.first_stage) trained its text encoder over its first stage's UNet, and the two go "
  "together: its result is the whole pipeline, WORKDIR/pipeline"
)
# Written into every folder the export command writes (export_latest, hub.write_folder): what lets a later export
# replace it. A folder without it is the user's, and an export refuses to write into it unless it is empty.
MARKER = ".advunlearn_export"
# What a folder may hold and still count as empty, and what replacing an export keeps: a clone of a Hub
# repository's git data (a new Hub repository holds .gitattributes).
KEPT = (".git", ".gitattributes")


def check_target(path: str, flag: str, workdir: str) -> None:
  """Refuses (ConfigError) an output folder that an export would overwrite without having written it: a training
  workdir, a folder holding one, or a non-empty folder that no export wrote (no MARKER)."""
  path, workdir = os.path.abspath(os.path.expanduser(path)), os.path.abspath(os.path.expanduser(workdir))
  if not os.path.isdir(path):
    return
  shown = f"--{flag}={path}"
  advice = "give a new or empty folder, or a previous export's"
  run_files = _holds_a_run(path)
  if run_files:
    raise ConfigError(f"{shown} is a training workdir (it holds {run_files}); {advice}")
  if os.path.commonpath([path, workdir]) == path:
    raise ConfigError(f"{shown} holds the workdir being exported ({workdir}); {advice}")
  names = set(os.listdir(path)) - set(KEPT)
  if names and MARKER not in names:
    raise ConfigError(f"{shown} is not empty and no export wrote it (it has no {MARKER}); {advice}")
  for folder, subfolders, _ in os.walk(path):  # a previous export: small
    subfolders[:] = [d for d in subfolders if d != ".git"]
    for inner in (os.path.join(folder, d) for d in subfolders):
      if _holds_a_run(inner):
        raise ConfigError(f"{shown} holds the training workdir {inner}; {advice}")


def _holds_a_run(folder: str) -> str:
  """What makes `folder` a training (or evaluation) run's: its checkpoints, or a lock not left by an export."""
  if os.path.isdir(os.path.join(folder, "checkpoints")):
    return "checkpoints/"
  lock = os.path.join(folder, workdir_lock.LOCK_NAME)
  return workdir_lock.LOCK_NAME if os.path.exists(lock) and not os.path.exists(os.path.join(folder, MARKER)) else ""


@contextlib.contextmanager
def claimed(path: str, flag: str, workdir: str) -> Iterator[None]:
  """Holds `path` for one export: checked (check_target), locked against a second writer, and marked as an
  export's. A failed export takes away the marker it added, so a folder it did not write is left as it was."""
  check_target(path, flag, workdir)
  os.makedirs(path, exist_ok=True)
  with workdir_lock.WorkdirLock(path, remove=True):
    added = not os.path.exists(os.path.join(path, MARKER))
    write_marker(path)
    try:
      yield
    except BaseException:
      if added:
        os.remove(os.path.join(path, MARKER))
      raise


def write_marker(folder: str, step: int | None = None) -> None:
  """MARKER, with the checkpoint step once known. No local path in it: a Hub folder is uploaded with it, so that
  a clone of the repository is recognised as an export."""
  weights_io.write_json(os.path.join(folder, MARKER), {"written_by": "advunlearn-jax export", "step": step})


def components(pipe: Pipeline | SDXLPipeline, tower: str) -> tuple[str, ...]:
  """The folders a trained `tower` (trainable.Trained.tower) writes: an SDXL text method writes both towers,
  always: the pair is what the UNet was conditioned by in training, and a loader that mixes one trained tower with
  another folder's second gets what it asked for only when that tower is the original."""
  if tower == "text_encoder" and isinstance(pipe, SDXLPipeline):
    return ("text_encoder", "text_encoder_2")
  return (tower,)


def write_component(
  out: str, pipe: Pipeline | SDXLPipeline, tower: str, params: Any, reference_name: str = ""
) -> dict[str, str]:
  """The trained `tower` with its `params`: `out/text_encoder` for CLIPTextModel.from_pretrained (SDXL: and
  `out/text_encoder_2` for CLIPTextModelWithProjection, `params` the step's {"text_encoder": ..., "text_encoder_2":
  ...}), or `out/unet` for the ESD-style UNet methods; with `reference_name` also `out/<reference_name>`, the
  reference's .pt (SD text encoders only)."""
  if tower == "unet":
    sd_convert.export_unet(pipe.unet_config, params, os.path.join(out, "unet"))
    return {"unet": os.path.join(out, "unet")}
  if isinstance(pipe, SDXLPipeline):
    return {
      name: clip_convert.export_clip_text(config, params[name], os.path.join(out, name))
      for name, config in (("text_encoder", pipe.text_config), ("text_encoder_2", pipe.text_config_2))
    }
  text_dir = os.path.join(out, "text_encoder")
  outputs = {"text_encoder": clip_convert.export_clip_text(pipe.text_config, params, text_dir)}
  if reference_name:
    path = os.path.join(out, reference_name)
    outputs["reference_checkpoint"] = clip_convert.export_reference_checkpoint(pipe.text_config, params, path)
  return outputs


def write(
  out: str, pipe: Pipeline | SDXLPipeline, tower: str, params: Any, enabled: bool = True, reference_name: str = ""
) -> dict[str, str]:
  """`write_component`, and `out/pipeline`, the source pipeline with it, for StableDiffusionPipeline (or
  StableDiffusionXLPipeline).from_pretrained (other components hard-linked where possible). `enabled=False` (the
  non-primary processes of a multi-host run) only returns the paths."""
  written = components(pipe, tower)
  paths = {name: os.path.join(out, name) for name in written}
  pipeline_dir = os.path.join(out, "pipeline")
  if not enabled:
    return {**paths, "pipeline": pipeline_dir}
  outputs = write_component(out, pipe, tower, params, reference_name)
  with weights_io.atomic_folder(pipeline_dir) as staging:
    os.rmdir(staging)
    ignore = shutil.ignore_patterns(*written, ".cache")
    shutil.copytree(pipe.root, staging, ignore=ignore, copy_function=_link_or_copy)
    for name in written:
      shutil.copytree(paths[name], os.path.join(staging, name))
  return {**outputs, **paths, "pipeline": pipeline_dir}


def _link_or_copy(src: str, dst: str) -> None:
  src = os.path.realpath(src)  # hub snapshots hold symlinks into the blob store
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def numbered_dir(workdir: str, step: int) -> str:
  return os.path.join(workdir, "exports", f"step_{step:06d}")


class Snapshot(NamedTuple):
  """A run's trained tower after `step` iterations, with the base pipeline it goes into."""

  step: int
  pipe: Pipeline | SDXLPipeline
  tower: str  # trainable.Trained.tower
  params: Any  # the tower's whole parameters, on the host
  final: bool  # the run's end (workdir/<tower>, workdir/pipeline) or a numbered export along the way


class RunExports:
  """A training run's exports, from its config: numbered ones along the way, the run's own at its end. Only
  the `enabled` process (the primary of a multi-host run) writes; the others get the paths."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self.method, self.with_reference = config.train.method, config.export.reference_checkpoint

  def __call__(self, snap: Snapshot) -> dict[str, str]:
    name = clip_convert.reference_checkpoint_name(self.method, snap.step - 1) if self.with_reference else ""
    if snap.final:
      return write(self.workdir, snap.pipe, snap.tower, snap.params, enabled=self.enabled, reference_name=name)
    if not self.enabled:
      return {}
    return write_component(numbered_dir(self.workdir, snap.step), snap.pipe, snap.tower, snap.params, name)


class Latest(NamedTuple):
  """A workdir's latest readable checkpoint, as the component it trained."""

  step: int
  config: ml_collections.ConfigDict  # the run's, as stored with the checkpoint
  trained: trainable.Trained
  pipe: Pipeline | SDXLPipeline  # the base pipeline (without its VAE)
  params: Any  # the trained tower's whole parameters


def latest(workdir: str, pretrained: str | None = None) -> Latest:
  """The latest checkpoint that reads back whole (damaged ones are named and skipped, as a resumed run does),
  merged into its base pipeline's tower (a two-stage run's: its first stage's, stages.base_root); `pretrained`
  overrides the base the run used."""
  step, meta, trained_leaves = checkpoint.latest_readable(workdir)
  config = ml_collections.ConfigDict(meta["config"])
  method = trainable.Trained.from_config(config.train)
  root = sd_convert.resolve_pretrained(pretrained) if pretrained else stages.base_root(config, workdir)
  pipe = sd_convert.load_either(root, with_vae=False)
  original = method.of(pipe.text_tree, pipe.unet_params)
  params = trainable.merge(trained_leaves, trainable.split(original, method.mask(original))[1])
  return Latest(step, config, method, pipe, params)


def export_latest(workdir: str, out: str, pretrained: str | None = None, fmt: str = "diffusers") -> dict[str, str]:
  """`write` (or with fmt="reference" the .pt) of `workdir`'s latest readable, finite checkpoint into `out`, which
  must be new, empty or a previous export (check_target)."""
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: expected one of {list(FORMATS)}")
  with claimed(out, "out", workdir):
    run = latest(workdir, pretrained)
    if fmt == "reference":
      outputs = {"reference_checkpoint": reference_checkpoint(run, out, workdir)}
      said = f"the reference's checkpoint in {outputs['reference_checkpoint']}"
    else:
      outputs = write(out, run.pipe, run.trained.tower, run.params)
      said = f"{run.trained.tower} in {outputs[run.trained.tower]}, pipeline in {outputs['pipeline']}"
    write_marker(out, run.step)
  print(f"step {run.step}: {said}")
  return outputs


def reference_checkpoint(run: Latest, out: str, workdir: str) -> str:
  """OUT/TextEncoder-<method>-epoch_<i>.pt of `run` (text encoders only: ConfigError for a UNet run)."""
  if isinstance(run.pipe, SDXLPipeline):
    raise ConfigError(
      f"{workdir}: --format=reference: the run trained SDXL's text towers; the reference's TextEncoder-*.pt holds "
      "SD 1.x's one text encoder (--format=diffusers writes OUT/text_encoder, OUT/text_encoder_2 and OUT/pipeline)"
    )
  if run.trained.tower != "text_encoder":
    raise ConfigError(
      f"{workdir}: --format=reference: train.method={run.trained.method!r} trains the UNet; the reference's "
      "TextEncoder-*.pt holds a text encoder (--format=diffusers writes OUT/unet and OUT/pipeline)"
    )
  if run.config.first_stage:
    raise ConfigError(f"{workdir}: --format=reference: {TWO_STAGES_NEED_THEIR_UNET} (--format=diffusers writes it)")
  name = clip_convert.reference_checkpoint_name(run.trained.method, run.step - 1)
  return clip_convert.export_reference_checkpoint(run.pipe.text_config, run.params, os.path.join(out, name))

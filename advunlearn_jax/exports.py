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

import os
import shutil
from typing import Any, NamedTuple

import ml_collections

from advunlearn_jax import checkpoint
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.pipeline import Pipeline
from advunlearn_jax.unlearn import trainable

FORMATS = ("diffusers", "reference")


def write_component(out: str, pipe: Pipeline, tower: str, params: Any, reference_name: str = "") -> dict[str, str]:
  """The trained `tower` (trainable.Trained.tower) with its `params`: `out/text_encoder` for
  CLIPTextModel.from_pretrained, or `out/unet` for the ESD-style UNet methods; with `reference_name` also
  `out/<reference_name>`, the reference's .pt (text encoders only)."""
  if tower == "unet":
    sd_convert.export_unet(pipe.unet_config, params, os.path.join(out, "unet"))
    return {"unet": os.path.join(out, "unet")}
  text_dir = os.path.join(out, "text_encoder")
  outputs = {"text_encoder": clip_convert.export_clip_text(pipe.text_config, params, text_dir)}
  if reference_name:
    path = os.path.join(out, reference_name)
    outputs["reference_checkpoint"] = clip_convert.export_reference_checkpoint(pipe.text_config, params, path)
  return outputs


def write(
  out: str, pipe: Pipeline, tower: str, params: Any, enabled: bool = True, reference_name: str = ""
) -> dict[str, str]:
  """`write_component`, and `out/pipeline`, the source pipeline with it, for
  StableDiffusionPipeline.from_pretrained (other components hard-linked where possible). `enabled=False` (the
  non-primary processes of a multi-host run) only returns the paths."""
  component_dir, pipeline_dir = os.path.join(out, tower), os.path.join(out, "pipeline")
  if not enabled:
    return {tower: component_dir, "pipeline": pipeline_dir}
  outputs = write_component(out, pipe, tower, params, reference_name)
  with weights_io.atomic_folder(pipeline_dir) as staging:
    os.rmdir(staging)
    shutil.copytree(pipe.root, staging, ignore=shutil.ignore_patterns(tower, ".cache"), copy_function=_link_or_copy)
    shutil.copytree(component_dir, os.path.join(staging, tower))
  return {**outputs, tower: component_dir, "pipeline": pipeline_dir}


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
  pipe: Pipeline
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
  pipe: Pipeline  # the base pipeline (without its VAE)
  params: Any  # the trained tower's whole parameters


def latest(workdir: str, pretrained: str | None = None) -> Latest:
  """The latest checkpoint that reads back whole (damaged ones are named and skipped, as a resumed run does),
  merged into its base pipeline's tower; `pretrained` overrides the base the run used."""
  step, meta, trained_leaves = checkpoint.latest_readable(workdir)
  config = ml_collections.ConfigDict(meta["config"])
  method = trainable.Trained.from_config(config.train)
  root = sd_convert.resolve_pretrained(pretrained or config.model.pretrained)
  pipe = sd_convert.load_pipeline(root, with_vae=False)
  original = method.of(pipe.text_params, pipe.unet_params)
  params = trainable.merge(trained_leaves, trainable.split(original, method.mask(original))[1])
  return Latest(step, config, method, pipe, params)


def export_latest(workdir: str, out: str, pretrained: str | None = None, fmt: str = "diffusers") -> dict[str, str]:
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: expected one of {list(FORMATS)}")
  run = latest(workdir, pretrained)
  if fmt == "reference":
    path = reference_checkpoint(run, out, workdir)
    print(f"step {run.step}: the reference's checkpoint in {path}")
    return {"reference_checkpoint": path}
  outputs = write(out, run.pipe, run.trained.tower, run.params)
  print(f"step {run.step}: {run.trained.tower} in {outputs[run.trained.tower]}, pipeline in {outputs['pipeline']}")
  return outputs


def reference_checkpoint(run: Latest, out: str, workdir: str) -> str:
  """OUT/TextEncoder-<method>-epoch_<i>.pt of `run` (text encoders only: ConfigError for a UNet run)."""
  if run.trained.tower != "text_encoder":
    raise ConfigError(
      f"{workdir}: --format=reference: train.method={run.trained.method!r} trains the UNet; the reference's "
      "TextEncoder-*.pt holds a text encoder (--format=diffusers writes OUT/unet and OUT/pipeline)"
    )
  name = clip_convert.reference_checkpoint_name(run.trained.method, run.step - 1)
  return clip_convert.export_reference_checkpoint(run.pipe.text_config, run.params, os.path.join(out, name))

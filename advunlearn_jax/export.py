"""Exports of a run's trained component: what the run writes when it ends, along the way, and on demand.

  python -m advunlearn_jax.export --workdir=workdirs/church --out=exports/church [--format=reference]

Writes OUT/text_encoder (CLIPTextModel.from_pretrained) and OUT/pipeline (StableDiffusionPipeline) from the
workdir's latest checkpoint, using the config stored with it to find the base pipeline (override with
--pretrained). `--format=reference` writes OUT/TextEncoder-<method>-epoch_<i>.pt instead: the reference's own
checkpoint layout (spec section 5), which UnlearnDiffAtk and AdvUnlearn's scripts load; they load with
strict=False, so a transformers folder handed to them silently loads nothing.

A run writes the same at its end (`export.reference_checkpoint` adds the .pt) and, every `export.every`
iterations, a numbered export `workdir/exports/step_NNNNNN/` beside the rolling checkpoints, so the
robustness/utility trade-off can be evaluated along the run (the reference saves at 200, 400, ...).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import ml_collections

from advunlearn_jax import checkpoint, cli
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


def export_latest(workdir: str, out: str, pretrained: str | None = None, fmt: str = "diffusers") -> dict[str, str]:
  if fmt not in FORMATS:
    raise ConfigError(f"--format={fmt!r}: expected one of {list(FORMATS)}")
  step, meta, trained = checkpoint.latest_readable(workdir)
  config = ml_collections.ConfigDict(meta["config"])
  method = trainable.Trained.from_config(config.train)
  if fmt == "reference" and method.tower != "text_encoder":
    raise ConfigError(
      f"{workdir}: --format=reference: train.method={method.method!r} trains the UNet; the reference's "
      "TextEncoder-*.pt holds a text encoder (--format=diffusers writes OUT/unet and OUT/pipeline)"
    )
  root = sd_convert.resolve_pretrained(pretrained or config.model.pretrained)
  pipe = sd_convert.load_pipeline(root, with_vae=False)
  original = method.of(pipe.text_params, pipe.unet_params)
  params = trainable.merge(trained, trainable.split(original, method.mask(original))[1])
  if fmt == "reference":
    name = clip_convert.reference_checkpoint_name(method.method, step - 1)
    path = clip_convert.export_reference_checkpoint(pipe.text_config, params, os.path.join(out, name))
    outputs = {"reference_checkpoint": path}
    print(f"step {step}: the reference's checkpoint in {outputs['reference_checkpoint']}")
    return outputs
  outputs = write(out, pipe, method.tower, params)
  print(f"step {step}: {method.tower} in {outputs[method.tower]}, pipeline in {outputs['pipeline']}")
  return outputs


def _define_flags():
  """Flags exist only when run as a script: train.run imports this module next to main's flags."""
  from absl import flags

  global _WORKDIR, _OUT, _PRETRAINED, _FORMAT
  _WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir holding checkpoints/")
  _OUT = flags.DEFINE_string("out", None, "output folder")
  _PRETRAINED = flags.DEFINE_string("pretrained", None, "base pipeline, if not the one the run used")
  _FORMAT = flags.DEFINE_enum(
    "format", "diffusers", FORMATS, "diffusers: OUT/text_encoder + OUT/pipeline; reference: OUT/TextEncoder-*.pt"
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  cli.check_output_folder(_OUT.value, "out")
  export_latest(_WORKDIR.value, _OUT.value, _PRETRAINED.value, _FORMAT.value)


if __name__ == "__main__":
  _define_flags()
  cli.run(main, output_flags=("out",))

"""Exports of a run's trained component: what the run writes when it ends, and the same on demand.

  python -m advunlearn_jax.export --workdir=workdirs/church --out=exports/church

Writes OUT/text_encoder (CLIPTextModel.from_pretrained) and OUT/pipeline (StableDiffusionPipeline) from the
workdir's latest checkpoint, using the config stored with it to find the base pipeline (override with
--pretrained).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import ml_collections

from advunlearn_jax import checkpoint, cli, config_lib
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.unlearn import trainable


def write(
  out: str, pipe: sd_convert.Pipeline, text_params: Any = None, unet_params: Any = None, enabled: bool = True
) -> dict[str, str]:
  """The trained component (`out/text_encoder` for CLIPTextModel.from_pretrained, or `out/unet` for the ESD-style
  UNet methods) and `out/pipeline`, the source pipeline with it, for StableDiffusionPipeline.from_pretrained
  (other components hard-linked where possible). `enabled=False` (the non-primary processes of a multi-host run)
  only returns the paths."""
  name = "text_encoder" if text_params is not None else "unet"
  component_dir, pipeline_dir = os.path.join(out, name), os.path.join(out, "pipeline")
  if not enabled:
    return {name: component_dir, "pipeline": pipeline_dir}
  if text_params is not None:
    clip_convert.export_clip_text(pipe.text_config, text_params, component_dir)
  else:
    sd_convert.export_unet(pipe.unet_config, unet_params, component_dir)
  with weights_io.atomic_folder(pipeline_dir) as staging:
    os.rmdir(staging)
    shutil.copytree(pipe.root, staging, ignore=shutil.ignore_patterns(name, ".cache"), copy_function=_link_or_copy)
    shutil.copytree(component_dir, os.path.join(staging, name))
  return {name: component_dir, "pipeline": pipeline_dir}


def _link_or_copy(src: str, dst: str) -> None:
  src = os.path.realpath(src)  # hub snapshots hold symlinks into the blob store
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


def export_latest(workdir: str, out: str, pretrained: str | None = None) -> dict[str, str]:
  mngr, step, meta = checkpoint.open_latest(workdir)
  config = ml_collections.ConfigDict(meta["config"])
  if not trainable.is_text_method(config.train.method):
    raise ConfigError(f"{workdir}: train.method={config.train.method!r} trains the UNet; there is no text encoder")
  root = sd_convert.resolve_pretrained(config_lib.resolve_pretrained(pretrained or config.model.pretrained))
  pipe = sd_convert.load_pipeline(root, with_vae=False)
  t = config.train
  mask = trainable.text_encoder_mask(pipe.text_params, t.method, t.component, t.norm_layer, t.prefix_bug)
  frozen_leaves = trainable.split(pipe.text_params, mask)[1]
  text_params = trainable.merge(checkpoint.restore_params(mngr, step), frozen_leaves)
  outputs = write(out, pipe, text_params)
  print(f"step {step}: text encoder in {outputs['text_encoder']}, pipeline in {outputs['pipeline']}")
  return outputs


def _define_flags():
  """Flags exist only when run as a script: train.run imports this module next to main's flags."""
  from absl import flags

  global _WORKDIR, _OUT, _PRETRAINED
  _WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir holding checkpoints/")
  _OUT = flags.DEFINE_string("out", None, "output folder")
  _PRETRAINED = flags.DEFINE_string("pretrained", None, "base pipeline, if not the one the run used")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  export_latest(_WORKDIR.value, _OUT.value, _PRETRAINED.value)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

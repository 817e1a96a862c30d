"""Export the text encoder of a run's latest checkpoint, on demand (the run itself exports when it ends).

  python -m advunlearn_jax.export --workdir=workdirs/church --out=exports/church

Writes OUT/text_encoder (CLIPTextModel.from_pretrained) and OUT/pipeline (StableDiffusionPipeline), using the
config stored with the checkpoint to find the base pipeline (override with --pretrained).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags

from advunlearn_jax import train
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.unlearn import trainable

_WORKDIR = flags.DEFINE_string("workdir", None, "a training workdir holding checkpoints/")
_OUT = flags.DEFINE_string("out", None, "output folder")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "base pipeline, if not the one the run used")


def export_latest(workdir: str, out: str, pretrained: str | None = None) -> dict[str, str]:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise ConfigError(f"{workdir}: no checkpoints/ folder; is this a training workdir?")
  mngr = ocp.CheckpointManager(os.path.abspath(ckpt_dir))
  step = mngr.latest_step()
  if step is None:
    raise ConfigError(f"{ckpt_dir}: no checkpoint yet")
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  config = ml_collections.ConfigDict(meta["config"])
  if not trainable.is_text_method(config.train.method):
    raise ConfigError(f"{workdir}: train.method={config.train.method!r} trains the UNet; there is no text encoder")
  pipe = sd_convert.load_pipeline(pretrained or config.model.pretrained, with_vae=False)
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  mask = trainable.text_encoder_mask(
    pipe.text_params, config.train.method, config.train.component, config.train.norm_layer, config.train.prefix_bug
  )
  frozen_leaves = trainable.split(pipe.text_params, mask)[1]
  text_params = trainable.merge(jax.device_get(state["params"]), frozen_leaves)
  outputs = train.export(out, pipe, text_params)
  print(f"step {step}: text encoder in {outputs['text_encoder']}, pipeline in {outputs['pipeline']}")
  return outputs


def main(argv):
  del argv
  export_latest(_WORKDIR.value, _OUT.value, _PRETRAINED.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)

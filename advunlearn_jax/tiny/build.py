"""Trains the tiny world's models from scratch and writes them where the repo ships them (the library:
tiny/training.py).

  python -m advunlearn_jax.tiny.build --out=advunlearn_jax/assets
  python -m advunlearn_jax.tiny.build --layout=sdxl --out=advunlearn_jax/assets   # tiny_sdxl/ on tiny_sd's VAE
"""

from __future__ import annotations

import os

from absl import flags

from advunlearn_jax import cli
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.tiny.training import build, build_sdxl

_OUT = flags.DEFINE_string(
  "out", "advunlearn_jax/assets", "Folder that receives tiny_sd/ and judge/ (--layout=sd), or tiny_sdxl/ (sdxl)."
)
_LAYOUT = flags.DEFINE_enum(
  "layout", "sd", ["sd", "sdxl"], "sd: judge, VAE, text tower + UNet; sdxl: two towers + SDXL UNet on tiny_sd's VAE."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the image pool, the inits and the batch order.")
_POOL = flags.DEFINE_integer("pool", 24576, "Rendered training images.")
_JUDGE_STEPS = flags.DEFINE_integer("judge_steps", 600, "")
_VAE_STEPS = flags.DEFINE_integer("vae_steps", 1200, "")
_SD_STEPS = flags.DEFINE_integer("sd_steps", 5000, "")
_SD_BATCH = flags.DEFINE_integer("sd_batch", 64, "")
_CONTINUE_FROM = flags.DEFINE_string(
  "continue_from", "", "A previous build's folder: keep its judge and VAE, continue the text tower + UNet from it."
)
_SD_LR = flags.DEFINE_float("sd_lr", 1e-3, "Peak learning rate of the text tower + UNet stage.")
_STAGE = flags.DEFINE_integer("stage", 1, "1 builds from scratch; N > 1 continues stage N-1 (--continue_from).")


def main(argv):
  del argv
  cli.check_output_folder(_OUT.value, "out")
  if _CONTINUE_FROM.value and not os.path.isdir(_CONTINUE_FROM.value):
    raise ConfigError(f"--continue_from={_CONTINUE_FROM.value}: no such folder (a previous build's --out)")
  for flag in (_POOL, _JUDGE_STEPS, _VAE_STEPS, _SD_STEPS, _SD_BATCH, _STAGE):
    if flag.value < 1:
      raise ConfigError(f"--{flag.name}={flag.value}: expected >= 1")
  common = dict(
    seed=_SEED.value,
    pool=_POOL.value,
    sd_steps=_SD_STEPS.value,
    sd_batch=_SD_BATCH.value,
    sd_lr=_SD_LR.value,
    continue_from=_CONTINUE_FROM.value,
    stage=_STAGE.value,
  )
  if _LAYOUT.value == "sdxl":
    for flag in (_JUDGE_STEPS, _VAE_STEPS):
      if flag.present:
        raise ConfigError(f"--{flag.name}: --layout=sdxl trains no {flag.name.split('_')[0]}; it reuses tiny_sd's")
    build_sdxl(_OUT.value, **common)
  else:
    build(_OUT.value, judge_steps=_JUDGE_STEPS.value, vae_steps=_VAE_STEPS.value, **common)


if __name__ == "__main__":
  cli.run(main, output_flags=("out",))

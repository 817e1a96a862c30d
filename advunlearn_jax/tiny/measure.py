"""Measures a tiny-world model with the judge (the library: tiny/quality.py).

  python -m advunlearn_jax.tiny.measure [--pipeline=DIR] [--out=DIR]

prints the model's recognition rate per attribute type (prompts naming a shape, a colour and a style) and per
value (`by_value`: which value a model fails), and writes quality.json and a sample grid to --out.
"""

from __future__ import annotations

import json
import os

from absl import flags

from advunlearn_jax import cli
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.tiny import judge as judge_lib
from advunlearn_jax.tiny.quality import JUDGE_DIR, SAMPLING, TINY_SD_DIR, base_quality

_PIPELINE = flags.DEFINE_string("pipeline", TINY_SD_DIR, "Tiny-world diffusers folder (SD or SDXL layout).")
_JUDGE = flags.DEFINE_string("judge", JUDGE_DIR, "Judge folder; a rebuild's own judge sees its own world.")
_OUT = flags.DEFINE_string("out", "", "If set: write quality.json and samples.png here.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Images per (shape, colour, style) combination.")


def main(argv):
  del argv
  if _OUT.value:
    cli.check_output_folder(_OUT.value, "out")
  if _REPEATS.value < 1:
    raise ConfigError(f"--repeats={_REPEATS.value}: expected >= 1")
  pipe = sd_convert.load_either(_PIPELINE.value)
  judge = judge_lib.load(_JUDGE.value)
  rates, by_value, images = base_quality(pipe, judge, repeats=_REPEATS.value)
  result = {
    "recognition_rate": rates,
    "by_value": by_value,
    "images": len(images),
    "sampling": SAMPLING,
  }
  print(json.dumps(result, indent=2))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "quality.json"), "w") as f:
      json.dump(result, f, indent=2)
    generation.save_png(os.path.join(_OUT.value, "samples.png"), generation.image_grid(images[:144], cols=24))


if __name__ == "__main__":
  cli.run(main, output_flags=("out",))

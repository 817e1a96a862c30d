"""Measuring the tiny model with the judge: how often generated images show what their prompt names.

  python -m advunlearn_jax.tiny.evaluate [--pipeline=DIR] [--out=DIR]

prints the base model's recognition rate per attribute type (prompts naming a shape, a colour and a style)
and per value (`by_value`: which value a model fails), and writes a sample grid.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from advunlearn_jax import cli
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.pipeline import Pipeline
from advunlearn_jax.tiny import judge as judge_lib
from advunlearn_jax.tiny import world

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TINY_SD_DIR = os.path.join(ASSETS, "tiny_sd")
JUDGE_DIR = os.path.join(ASSETS, "judge")
# Sampling settings for every tiny-world measurement (what the shipped model was checked with).
SAMPLING = {"scheduler": "ddim", "steps": 25, "guidance": 5.0}


def generate(pipe: Pipeline, prompts: Sequence[str], seed: int, text_params: Any = None, chunk: int = 96):
  latents = generation.initial_latents(pipe, len(prompts), seed)
  out = [
    generation.generate(pipe, prompts[i : i + chunk], latents[i : i + chunk], text_params=text_params, **SAMPLING)
    for i in range(0, len(prompts), chunk)
  ]
  return np.concatenate(out)


def full_prompts(n_per_combo: int = 1) -> tuple[list[str], np.ndarray]:
  """Every (shape, colour, style) once per repeat, phrased canonically; returns prompts and [N, 3] labels."""
  combos = list(itertools.product(*(range(len(v)) for v in world.ATTRIBUTE_TYPES.values()))) * n_per_combo
  prompts = [world.canonical_prompt(shape=s, color=c, style=t) for s, c, t in combos]
  return prompts, np.array(combos)


def recognition_rates(pred: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
  """Per attribute type: the fraction of images whose judged value (`pred`, judge_lib.predict) is the prompt's."""
  return {k: float(np.mean(pred[k] == labels[:, i])) for i, k in enumerate(world.ATTRIBUTE_TYPES)}


def rates_by_value(pred: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, dict[str, float]]:
  """Per attribute type and value: the fraction of images prompted with that value that the judge reads as it;
  this is where a model that fails one attribute type fails (e.g. checkered drawn as striped). Values no image
  was prompted with are left out."""
  return {
    kind: {
      name: float(np.mean(pred[kind][labels[:, i] == v] == v)) for v, name in enumerate(values) if v in labels[:, i]
    }
    for i, (kind, values) in enumerate(world.ATTRIBUTE_TYPES.items())
  }


def base_quality(
  pipe, judge, seed: int = 0, repeats: int = 2
) -> tuple[dict[str, float], dict[str, dict[str, float]], np.ndarray]:
  """Every (shape, colour, style) prompt `repeats` times, judged: rates per attribute type, per value, and the
  images."""
  prompts, labels = full_prompts(repeats)
  images = generate(pipe, prompts, seed)
  pred = judge_lib.predict(*judge, images)
  return recognition_rates(pred, labels), rates_by_value(pred, labels), images


def _define_flags():
  """Flags exist only when run as a script, so importing this module next to other CLIs does not clash."""
  global _PIPELINE, _JUDGE, _OUT, _REPEATS
  _PIPELINE = flags.DEFINE_string("pipeline", TINY_SD_DIR, "Tiny-world diffusers folder.")
  _JUDGE = flags.DEFINE_string("judge", JUDGE_DIR, "Judge folder; a rebuild's own judge sees its own world.")
  _OUT = flags.DEFINE_string("out", "", "If set: write quality.json and samples.png here.")
  _REPEATS = flags.DEFINE_integer("repeats", 2, "Images per (shape, colour, style) combination.")


def main(argv):
  del argv
  if _OUT.value:
    cli.check_output_folder(_OUT.value, "out")
  if _REPEATS.value < 1:
    raise ConfigError(f"--repeats={_REPEATS.value}: expected >= 1")
  pipe = sd_convert.load_pipeline(_PIPELINE.value)
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
  _define_flags()
  cli.run(main, output_flags=("out",))

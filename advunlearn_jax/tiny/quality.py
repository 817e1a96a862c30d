"""Measuring a tiny-world model with the judge: how often generated images show what their prompt names, per
attribute type and per value (the `tiny.measure` command prints them for a model)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from advunlearn_jax.diffusion import generation
from advunlearn_jax.models.pipeline_record import Pipeline, SDXLPipeline
from advunlearn_jax.tiny import judge as judge_lib
from advunlearn_jax.tiny import world

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
TINY_SD_DIR = os.path.join(ASSETS, "tiny_sd")
JUDGE_DIR = os.path.join(ASSETS, "judge")
# Sampling settings for every tiny-world measurement (what the shipped model was checked with).
SAMPLING = {"scheduler": "ddim", "steps": 25, "guidance": 5.0}


def generate(
  pipe: Pipeline | SDXLPipeline, prompts: Sequence[str], seed: int, text_params: Any = None, chunk: int = 96
):
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

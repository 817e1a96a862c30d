"""The retain set: prompts whose images must not change, and their sampling without replacement per epoch.

The package ships the reference's four retain sets (`assets/retain/`, object names in the reference CSVs' row
order, each prompt "a photo of <name>"): `coco_object` (the paper's, COCO objects with nudity-related words
filtered out), `coco_object_no_filter`, `imagenet243` and `imagenet243_no_filter`. `retain.dataset` names one
of them, a CSV in the reference format (columns `case_num, source, prompt`; only `prompt` is read), a caption
set `tfds:NAME[/CONFIG]:SPLIT` (each example's first caption, data/tfds_source.py), or is empty when
`retain.prompts` lists the prompts themselves (the tiny world does).
"""

from __future__ import annotations

import csv
import os
from typing import NamedTuple

import numpy as np

from advunlearn_jax.errors import ConfigError

TEMPLATE = "a photo of {}"
DATASETS = ("coco_object", "coco_object_no_filter", "imagenet243", "imagenet243_no_filter")
DATASET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "retain")


MODES = ("reg", "iter")


class RetainConfig(NamedTuple):
  """The retain term's settings, under config.retain's field names (its prompts are `from_config`'s; its defaults
  config_lib's)."""

  mode: str  # reg: L_u + weight * L_r; iter: `steps` extra Adam steps on L_r
  weight: float
  batch: int
  steps: int
  fresh_per_step: bool  # iter: each extra step draws its own prompts

  @classmethod
  def from_config(cls, section) -> RetainConfig:
    """`config.retain`'s step settings, validated."""
    cfg = cls(**{name: section[name] for name in cls._fields})
    if cfg.mode not in MODES:
      raise ConfigError(f"config.retain.mode is {cfg.mode!r}; expected one of {list(MODES)}")
    return cfg


def load_dataset(name: str) -> list[str]:
  """The prompts of a shipped retain set, in the reference's row order (repeats included)."""
  if name not in DATASETS:
    raise ConfigError(f"config.retain.dataset is {name!r}: expected one of {list(DATASETS)} or a CSV path")
  with open(os.path.join(DATASET_DIR, f"{name}.txt"), encoding="utf-8") as f:
    return [TEMPLATE.format(line.rstrip("\n")) for line in f if line.strip() and not line.startswith("#")]


def load_csv(path: str) -> list[str]:
  """The `prompt` column of a reference-format CSV."""
  if not os.path.isfile(path):
    raise ConfigError(f"config.retain.dataset: {path} not found (expected one of {list(DATASETS)} or a CSV path)")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
      found = f"columns: {reader.fieldnames}" if reader.fieldnames else "the file is empty"
      raise ConfigError(
        f"config.retain.dataset: {path} has no 'prompt' column ({found}); expected the reference format "
        "case_num,source,prompt"
      )
    prompts = [row["prompt"].strip() for row in reader if (row.get("prompt") or "").strip()]
  if not prompts:
    raise ConfigError(f"config.retain.dataset: the 'prompt' column of {path} is empty")
  return prompts


def from_config(config) -> list[str]:
  """The run's retain prompts: `retain.prompts`, or the set `retain.dataset` names; exactly one is given."""
  dataset, listed = config.retain.dataset, list(config.retain.prompts)
  if dataset and listed:
    raise ConfigError(
      f"config.retain.prompts lists {len(listed)} prompts and config.retain.dataset is {dataset!r}; keep one "
      "(retain.dataset='' to train with the listed prompts)"
    )
  if not dataset and not listed:
    raise ConfigError(f"config.retain.dataset is empty and so is config.retain.prompts; e.g. {DATASETS[0]!r}")
  if listed:
    return listed
  if dataset.startswith("tfds:"):
    from advunlearn_jax.data import tfds_source

    return list(tfds_source.captions(dataset, "retain.dataset"))
  return load_dataset(dataset) if dataset in DATASETS else load_csv(dataset)


class SamplerState(NamedTuple):
  epoch: int
  cursor: int


def sample(state: SamplerState, n_prompts: int, batch: int, seed: int) -> tuple[np.ndarray, SamplerState]:
  """`batch` indices without replacement within an epoch; a new epoch (a fresh permutation) starts when fewer
  than `batch` unseen prompts remain, as the reference's PromptDataset. Deterministic in (seed, state)."""
  if batch > n_prompts:
    raise ConfigError(f"config.retain.batch ({batch}) exceeds the number of retain prompts ({n_prompts})")
  epoch, cursor = state
  if n_prompts - cursor < batch:
    epoch, cursor = epoch + 1, 0
  order = np.random.default_rng([seed, epoch]).permutation(n_prompts)
  return order[cursor : cursor + batch].astype(np.int32), SamplerState(epoch, cursor + batch)

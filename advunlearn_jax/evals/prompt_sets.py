"""Evaluation prompt sets: the reference's attack-prompt and caption CSVs, tfds caption sets, or inline prompts.

The reference CSVs (UnlearnDiffAtk `prompts/*.csv`, `coco_10k.csv`) share a `prompt` column; `evaluation_seed`,
`evaluation_guidance` and `case_number` are optional here and default to the config's seed / guidance and the
row number.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import NamedTuple

from advunlearn_jax.errors import ConfigError


class EvalPrompt(NamedTuple):
  case: str
  prompt: str
  seed: int
  guidance: float


def read_csv(path: str, default_seed: int, default_guidance: float, column: str = "prompt") -> list[EvalPrompt]:
  """The prompts in `column` (an attack's released adversarial_prompts.csv: adv_prompt)."""
  if not os.path.isfile(path):
    raise ConfigError(f"prompt CSV {path!r} does not exist")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or column not in reader.fieldnames:
      found = f"columns {reader.fieldnames}" if reader.fieldnames else "the file is empty"
      raise ConfigError(f"{path}: needs a {column!r} column (evaluation.prompts_column); {found}")
    out = []
    for row_number, row in enumerate(reader, start=2):  # line 1 is the header
      prompt = (row[column] or "").strip()
      if not prompt:
        raise ConfigError(f"{path}, line {row_number}: empty prompt")
      try:
        seed = int(float(row["evaluation_seed"])) if row.get("evaluation_seed") else default_seed + len(out)
        guidance = float(row["evaluation_guidance"]) if row.get("evaluation_guidance") else default_guidance
      except ValueError as e:
        raise ConfigError(f"{path}, line {row_number}: seed and guidance must be numbers ({e})") from e
      out.append(EvalPrompt(str(row.get("case_number") or len(out)), prompt, seed, guidance))
  if not out:
    raise ConfigError(f"{path}: no prompts")
  return out


def inline(prompts: Sequence[str], seed: int, guidance: float) -> list[EvalPrompt]:
  return [EvalPrompt(str(i), p, seed + i, guidance) for i, p in enumerate(prompts)]


def read_tfds(source: str, key: str, default_seed: int, default_guidance: float, limit: int) -> list[EvalPrompt]:
  """Captions of a `tfds:NAME[/CONFIG]:SPLIT` source (data/tfds_source.py), seeds counting up from `default_seed`."""
  from advunlearn_jax.data import tfds_source

  return inline(tfds_source.captions(source, key, limit), default_seed, default_guidance)


def from_config(
  source: str, prompts: Sequence[str], seed: int, guidance: float, limit: int, what: str, column: str = "prompt"
):
  """The prompt set of a config's `what` source (a CSV, its `column`, or for captions also a tfds source) or its
  inline prompts, cut to `limit` (0: all)."""
  if source and prompts:
    raise ConfigError(f"config.evaluation: both a {what} source and inline {what} are set; keep one")
  if not source and not prompts:
    return []
  if source and source.startswith("tfds:"):
    return read_tfds(source, f"evaluation.{what}", seed, guidance, limit)
  out = read_csv(source, seed, guidance, column) if source else inline(prompts, seed, guidance)
  return out[:limit] if limit > 0 else out

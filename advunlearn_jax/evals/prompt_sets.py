"""Evaluation prompt sets: the reference's attack-prompt and caption CSVs, or inline prompts.

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


def read_csv(path: str, default_seed: int, default_guidance: float) -> list[EvalPrompt]:
  if not os.path.isfile(path):
    raise ConfigError(f"prompt CSV {path!r} does not exist")
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or "prompt" not in reader.fieldnames:
      raise ConfigError(f"{path}: needs a 'prompt' column; found {reader.fieldnames}")
    out = []
    for row_number, row in enumerate(reader, start=2):  # line 1 is the header
      prompt = (row["prompt"] or "").strip()
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


def from_config(csv_path: str, prompts: Sequence[str], seed: int, guidance: float, limit: int, what: str):
  """The prompt set named by a config's `{what}_csv` / inline fields, cut to `limit` (0: all)."""
  if csv_path and prompts:
    raise ConfigError(f"config.evaluation: both a {what} CSV and inline {what} are set; keep one")
  if not csv_path and not prompts:
    return []
  out = read_csv(csv_path, seed, guidance) if csv_path else inline(prompts, seed, guidance)
  return out[:limit] if limit > 0 else out

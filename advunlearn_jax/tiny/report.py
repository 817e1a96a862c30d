"""The tiny world's erasure report: recognition rates of the erased and the retained attribute values,
before (the shipped model) and after (the run's exported pipeline), judged on the same initial latents.

Writes `report.md`, `report.json`, `erased_before_after.png` and `retained_before_after.png` (top rows: the
original model, bottom rows: the unlearned one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from advunlearn_jax import rates
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models.pipeline_record import Pipeline, SDXLPipeline
from advunlearn_jax.tiny import judge as judge_lib
from advunlearn_jax.tiny import quality, world


def erased_attributes(concepts: Sequence[str]) -> list[tuple[str, int]]:
  """(attribute type, value index) named by each concept, e.g. 'triangle' -> ('shape', 2)."""
  out = []
  for concept in concepts:
    words = concept.strip().lower().replace(",", " ").split()
    hits = [(k, values.index(w)) for w in words for k, values in world.ATTRIBUTE_TYPES.items() if w in values]
    if not hits:
      vocab = {k: list(v) for k, v in world.ATTRIBUTE_TYPES.items()}
      raise ConfigError(f"concept {concept!r} names no tiny-world attribute; the report knows {vocab}")
    out.extend(hits)
  return out


def write(
  out_dir: str,
  original: str | Pipeline | SDXLPipeline,
  unlearned: str | Pipeline | SDXLPipeline,
  concepts: Sequence[str],
  per_value: int = 24,
  seed: int = 1,
  erased_values: Sequence[str] = (),
) -> dict:
  """`erased_values` names the erased tiny-world values; empty: every value a concept prompt names."""
  erased = [world.attribute_of(v) for v in erased_values] if erased_values else erased_attributes(concepts)
  judge = judge_lib.load(quality.JUDGE_DIR)
  load = lambda p: p if isinstance(p, Pipeline | SDXLPipeline) else sd_convert.load_either(p)
  pipes = {"before": load(original), "after": load(unlearned)}
  results: dict = {"concepts": list(concepts), "sampling": quality.SAMPLING, "images_per_value": per_value}
  grids: dict[str, list[np.ndarray]] = {"erased": [], "retained": []}
  for kind in dict.fromkeys(k for k, _ in erased):
    values = world.ATTRIBUTE_TYPES[kind]
    prompts = [p for v in range(len(values)) for p in world.attribute_prompts(kind, v, per_value)]
    labels = np.repeat(np.arange(len(values)), per_value)
    images = {name: quality.generate(pipe, prompts, seed) for name, pipe in pipes.items()}
    judged = {name: judge_lib.predict(*judge, im)[kind] for name, im in images.items()}
    rows = []
    for v, value in enumerate(values):
      sel = labels == v
      rate = {name: float(np.mean(judged[name][sel] == v)) for name in pipes}
      is_erased = (kind, v) in erased
      rows.append({"value": value, "erased": is_erased, **rate})
      shown = slice(0, 8) if is_erased else slice(0, 2)
      pair = [images[name][sel][shown] for name in pipes]
      grids["erased" if is_erased else "retained"].append(pair)
    results[kind] = rows
  for which, pairs in grids.items():
    if pairs:
      before, after = (np.concatenate([p[i] for p in pairs]) for i in range(2))
      grid = generation.image_grid(np.concatenate([before, after]), cols=len(before))
      generation.save_png(
        os.path.join(out_dir, f"{which}_before_after.png"), np.kron(grid, np.ones((2, 2, 1), np.uint8))
      )
  results["summary"] = _summary(results, erased)
  results["rates"] = _rates(results, erased, per_value)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(_markdown(results))
  return results


def _summary(results: dict, erased: list[tuple[str, int]]) -> dict:
  rows = [r for k in dict.fromkeys(k for k, _ in erased) for r in results[k]]
  mean = lambda rs, key: float(np.mean([r[key] for r in rs])) if rs else float("nan")
  gone = [r for r in rows if r["erased"]]
  kept = [r for r in rows if not r["erased"]]
  return {
    "erased_before": mean(gone, "before"),
    "erased_after": mean(gone, "after"),
    "retained_before": mean(kept, "before"),
    "retained_after": mean(kept, "after"),
  }


def _rates(results: dict, erased: list[tuple[str, int]], per_value: int) -> dict:
  """The summary's four rates as counts of judged images with Wilson intervals (rates.py)."""
  rows = [r for k in dict.fromkeys(k for k, _ in erased) for r in results[k]]
  out = {}
  for group, sel in (("erased", [r for r in rows if r["erased"]]), ("retained", [r for r in rows if not r["erased"]])):
    n = per_value * len(sel)
    for when in ("before", "after"):
      if n:
        k = round(sum(r[when] * per_value for r in sel))
        out[f"{group}_{when}"] = rates.rate(k, n).to_json()
  return out


def _rate_text(results: dict, key: str) -> str:
  r = results.get("rates", {}).get(key)
  return str(rates.Rate(r["k"], r["n"], *r["ci95"])) if r else f"{results['summary'][key]:.1%}"


def _markdown(results: dict) -> str:
  lines = [
    "# Tiny-world erasure report",
    "",
    f"Concepts erased: {', '.join(results['concepts'])}. {results['images_per_value']} images per value, "
    f"sampler {results['sampling']}; the judge decides what each image shows.",
    "",
    f"- erased: recognition {_rate_text(results, 'erased_before')} before -> "
    f"{_rate_text(results, 'erased_after')} after",
    f"- retained (the other values): {_rate_text(results, 'retained_before')} before -> "
    f"{_rate_text(results, 'retained_after')} after",
    "",
  ]
  for kind in world.ATTRIBUTE_TYPES:
    if kind not in results:
      continue
    lines += [f"## {kind}", "", "| value | erased | before | after |", "|---|---|---|---|"]
    for r in results[kind]:
      lines.append(f"| {r['value']} | {'yes' if r['erased'] else ''} | {r['before']:.1%} | {r['after']:.1%} |")
    lines.append("")
  lines += [
    "Grids: `erased_before_after.png` and `retained_before_after.png` (top: before, bottom: after, same latents).",
    "",
  ]
  return "\n".join(lines)

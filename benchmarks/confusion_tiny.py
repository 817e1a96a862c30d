"""What an erasure does to each value of the concept's attribute: the judge's verdicts on every value's prompts.

  python benchmarks/confusion_tiny.py --concept=striped --runs=base,robust_seed0,defence_esd_full_batch15_seed0 --write

Retain accuracy (erasure_tiny.py) is one number over the other values. This splits it: for each kept run under
--out/<concept>/ (its exported `pipeline`; `base` is the shipped model), --per_value images of every value of the
concept's attribute, each on its own prompts, and what the judge sees in them. The retained values' rows are
rendered exactly as retain accuracy renders them (same prompts, same batch, same seed), so their diagonal is the
table's retain count; the concept's own row (its prompts, unattacked) shows where the erasure sends it. It shows
which values an erasure costs, and whether a value's prompts now render the erased one (a leak that retain
accuracy counts only as a miss). Prints the table; --write puts it in confusion_<concept>.md under --out (the
committed one holds every run of the command in docs/results.md, "Where the textures go").
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from advunlearn_jax import config_lib  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.tiny import world  # noqa: E402
from benchmarks import erasure_tiny  # noqa: E402


def confusion(pipe, concept: str, per_value: int, seed: int = erasure_tiny.RETAIN_SEED) -> np.ndarray:
  """counts[prompted value, judged value] over the concept's attribute; the retained rows as retain accuracy's."""
  kind, index = world.attribute_of(concept)
  n = len(world.ATTRIBUTE_TYPES[kind])
  counts = np.zeros((n, n), int)
  for values in (erasure_tiny.retained_values(concept), [index]):  # two batches: the first is retain accuracy's
    labels, verdicts = erasure_tiny.judged_values(pipe, concept, values, per_value, seed)
    np.add.at(counts, (labels, verdicts), 1)
  return counts


def table(concept: str, results: dict[str, np.ndarray]) -> str:
  kind, index = world.attribute_of(concept)
  names = world.ATTRIBUTE_TYPES[kind]
  lines = [
    f"| run | prompted | {' | '.join(f'judged {n}' for n in names)} |",
    f"|---|---|{'---|' * len(names)}",
  ]
  for run, counts in results.items():
    for v, name in enumerate(names):
      shown = " (erased)" if v == index else ""
      lines.append(f"| {run} | {name}{shown} | {' | '.join(str(c) for c in counts[v])} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  values = [v for kind in world.ATTRIBUTE_TYPES.values() for v in kind]
  parser.add_argument("--concept", default="striped", choices=values, help="a tiny-world value")
  parser.add_argument("--runs", default="base", help="comma-separated run folders under --out/<concept>/, or base")
  parser.add_argument("--out", default=erasure_tiny.OUT)
  parser.add_argument("--per_value", type=int, default=12, help="images per value (erasure_tiny.py's default)")
  parser.add_argument("--write", action="store_true", help="write the table to --out/confusion_<concept>.md")
  args = parser.parse_args(argv)
  results = {}
  for run in args.runs.split(","):
    folder = config_lib.TINY_MODEL_DIR if run == "base" else os.path.join(args.out, args.concept, run, "pipeline")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
      parser.exit(2, f"error: {folder} holds no exported pipeline (train the run with erasure_tiny.py first)\n")
    results[run] = confusion(sd_convert.load_pipeline(folder), args.concept, args.per_value)
    erasure_tiny.release_compiled()
  text = table(args.concept, results)
  print(text, end="")
  if args.write:
    with open(os.path.join(args.out, f"confusion_{args.concept}.md"), "w") as f:
      f.write(f"Judge's verdicts, {args.per_value} images per value (`benchmarks/confusion_tiny.py`)\n\n{text}")
  return results


if __name__ == "__main__":
  main()

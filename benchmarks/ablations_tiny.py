"""The paper's ablations on the tiny world, each row over several seeds, in one resumable command.

  python benchmarks/ablations_tiny.py                  # every row, 3 seeds, into benchmarks/results/tiny_tables
  python benchmarks/ablations_tiny.py --out=/tmp/smoke --concepts=triangle --seeds=0 --variants=advunlearn,esd \\
      --iterations=10 --quick

Every variant is configs/tiny.py on the faithful path (online rollouts) with one change (VARIANTS); the
AdvUnlearn row is the reference for all of them: the text encoder, retain regulariser on, PGD with 30 attack
steps, the whole encoder, online rollouts (the renewing bank is its own row, `bank`). `esd` is the paper's ESD
(the UNet without cross-attention, no attack, no retain term); `esd_retain` keeps the retain term. Each run is
measured on the same cases (the concept's evaluation prompts at as many seeds as --prompts needs) by
UnlearnDiffAtk (pre-ASR and ASR), by the published concept inversion (CCE, evals/inversion.py, ASR at each of
--inversion_budgets), by retain accuracy (the judge's recognition of the other values of the erased attribute)
and by its training time (without compilation). Finished pieces (each run's training record and measurements,
small JSON files) are kept under --out, shared with erasure_tiny.py, and never redone (erasure_tiny.py's
docstring says how the README's pieces are kept in git). Prints the table (mean +- std over seeds and the count pooled
over seeds with its 95% Wilson interval) and writes ablations.md, ablations.json and, per concept, the inversion ASR
against budget of every variant in one PNG.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import NamedTuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from advunlearn_jax import config_lib  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.evals import attacks, budgets  # noqa: E402
from advunlearn_jax.tiny import prompts as tiny_prompts  # noqa: E402
from advunlearn_jax.tiny import world  # noqa: E402
from benchmarks import erasure_tiny  # noqa: E402


class Variant(NamedTuple):
  method: str  # erasure_tiny's: "advunlearn" attacks after warm-up, "esd" never attacks
  overrides: tuple[str, ...]  # section.field=value on configs/tiny.py, as --config.section.field=value
  ablation: str  # which of the paper's questions the row answers
  paper: str  # the paper's finding for it
  # A two-stage recipe: the variant (same concept and seed) trained first, into this run's workdir/first_stage
  # (config.first_stage); its exported UNet and text encoder are this run's frozen original.
  after: str = ""
  # Retain prompts restricted to these other values of the erased attribute (tiny/prompts.retain_prompts); `run`
  # skips a concept of another attribute (`applies`).
  retain_values: tuple[str, ...] = ()


PAPER_ESD = (
  "nudity ASR under UnlearnDiffAtk: ESD 76.05% vs AdvUnlearn 21.13% (UnlearnDiffAtk benchmark table, spec 6.3; "
  "the paper's table may read 73.24%)"
)
# Every row is configs/tiny.py on the faithful path (online rollouts, as the reference) with one change.
VARIANTS = {
  "advunlearn": Variant("advunlearn", (), "reference", "AdvUnlearn: robust erasure with utility kept: " + PAPER_ESD),
  "unet": Variant(
    "advunlearn",
    ("train.method=noxattn",),
    "optimised module",
    "the text encoder is the better module to robustify: AdvUnlearn on the UNet erases less effectively (paper's "
    "UNet-vs-text-encoder ablation; its numbers were not retrievable, spec 6.3)",
  ),
  "esd": Variant(
    "esd",
    ("train.method=noxattn", "retain.weight=0.0"),
    "no adversarial training",
    "the paper's ESD (UNet, no attack, no retain term) erases, but adversarial prompts bring the concept back: "
    + PAPER_ESD,
  ),
  "esd_retain": Variant(
    "esd", ("train.method=noxattn",), "no adversarial training (ours)", "(not in the paper) ESD with the retain term"
  ),
  "no_retain": Variant(
    "advunlearn", ("retain.weight=0.0",), "retain regulariser", "plain AT without the retain set costs image quality"
  ),
  "fast_at": Variant(
    "advunlearn",
    ("attack.method=fast_at",),
    "attack scheme",
    "fast AT is cheaper, slightly less robust (the reference's fast-AT command keeps 30 attack steps, as this row)",
  ),
  "steps1": Variant("advunlearn", ("attack.steps=1",), "attack steps", "fewer attack steps: less robust"),
  "steps10": Variant("advunlearn", ("attack.steps=10",), "attack steps", "fewer attack steps: less robust"),
  "steps100": Variant(
    "advunlearn",
    ("attack.steps=100",),
    "attack steps (ours)",
    "(not in the paper) does a training attack longer than the reference's 30 steps cover concept inversion?",
  ),
  "layer0": Variant(
    "advunlearn",
    ("train.method=text_encoder_layer0",),
    "optimised layers",
    "the first layer alone is a cheap alternative that keeps much of the robustness",
  ),
  "bank": Variant(
    "advunlearn",
    ("train.xt_source=bank",),
    "rollouts (ours)",
    "(not in the paper) the renewing trajectory bank should match online rollouts at a fraction of the cost",
  ),
}
RATE_COLUMNS = erasure_tiny.COLUMNS


def fmt_seconds(values: list) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  return f"{np.mean(values):.0f}" + (f" +- {np.std(values):.0f}" if len(values) > 1 else "")


def by_variant(rows: dict[tuple[str, str], list[dict]], concepts: list[str], names: list[str], budget: int) -> str:
  """One row per variant, the concepts side by side: each attack's successes and the retain accuracy as counts
  pooled over seeds with their Wilson intervals (the README's table; pre-ASR stays in the full one)."""
  titles = ("UnlearnDiffAtk", f"CCE, {budget} steps", "earlier: CCE in front, 250 steps", "Ring-A-Bell", "P4D")
  titles += ("MMA-Diffusion", "any attack", "retain")
  columns = [(title, k, n) for title, (_, k, n) in zip(titles, RATE_COLUMNS[1:], strict=True)]
  head = " | ".join(f"{c}: {t}" if i == 0 else t for c in concepts for i, (t, _, _) in enumerate(columns))
  lines = [f"| variant | {head} |", "|---" * (1 + len(concepts) * len(columns)) + "|"]
  for name in (n for n in names if any((c, n) in rows for c in concepts)):  # --from_pieces leaves rows out
    cells = [erasure_tiny.fmt_count(rows.get((c, name), [{}]), k, n) for c in concepts for _, k, n in columns]
    lines.append(f"| `{name}` | {' | '.join(cells)} |")
  return "\n".join(lines)


def parse_args(description: str, variants: dict[str, Variant]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=erasure_tiny.OUT, help="runs and their JSON pieces (shared with erasure_tiny)")
  parser.add_argument("--concepts", default="triangle,striped")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--variants", default=",".join(variants))
  parser.add_argument("--iterations", type=int, default=0, help="0: configs/tiny.py's")
  parser.add_argument("--per_value", type=int, default=12, help="retain-accuracy images per retained value")
  parser.add_argument("--prompts", type=int, default=24, help="evaluation cases (prompt, seed) per concept and run")
  parser.add_argument("--inversion_budgets", default=erasure_tiny.PUBLISHED_BUDGETS, help="CCE checkpoints (steps)")
  parser.add_argument("--attacks", default=",".join(erasure_tiny.ALL_ATTACKS), help="the columns measured")
  parser.add_argument("--refresh_verdicts", action="store_true", help="measure again pieces without per-case verdicts")
  parser.add_argument("--quick", action="store_true", help="a 3-prompt, 10-iteration UnlearnDiffAtk (smoke test)")
  parser.add_argument("--from_pieces", action="store_true", help="table the pieces there are, computing none")
  args = parser.parse_args()
  unknown = sorted(set(args.variants.split(",")) - set(variants))
  if unknown:
    parser.error(f"unknown variants {unknown}; known: {list(variants)}")
  return args


def applies(variant: Variant, concept: str) -> bool:
  """Whether `variant` can run on `concept`: its retain values, if any, are other values of the concept's attribute
  (a texture-only retain set has no meaning for a shape)."""
  return set(variant.retain_values) <= set(world.other_values(concept))


def variant_config(variants: dict[str, Variant], name: str, concept: str, seed: int, args):
  """The run's config; a second stage's holds its first stage as config.first_stage (training/stages.py), which
  main would train too: the first variant's config written as overrides of this one."""
  variant = variants[name]
  overrides = [*erasure_tiny.FAITHFUL, *variant.overrides]
  if variant.retain_values:
    overrides.append(f"retain.prompts={tiny_prompts.retain_prompts(concept, variant.retain_values)!r}")
  config = erasure_tiny.run_config(concept, variant.method, seed, args.iterations, overrides)
  if not variant.after:
    return config
  first = variant_config(variants, variant.after, concept, seed, args)
  return config_lib.override(config, [f"first_stage={stage_items(first, config)!r}"])


def stage_items(first, second) -> tuple[str, ...]:
  """The "section.field=value" items that turn config `second` into `first`."""
  a, b = config_lib.flatten(first.to_dict()), config_lib.flatten(second.to_dict())
  literal = lambda v: repr(v) if isinstance(v, (tuple, list)) else str(v)  # noqa: E731  as the command line's
  return tuple(f"{k}={literal(v)}" for k, v in a.items() if v != b.get(k))


def run(variants: dict[str, Variant], args: argparse.Namespace, stem: str, folder_prefix: str = "") -> None:
  """Trains and measures each of `args.variants` (run `{folder_prefix}{name}_seed{seed}` under each concept of
  --out), then writes `{stem}.md`, `{stem}.json` and the CCE curves per concept."""
  log = lambda msg: print(msg, flush=True)
  base = functools.cache(lambda: sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR))
  started = time.perf_counter()
  rows: dict[tuple[str, str], list[dict]] = {}
  concepts, names = args.concepts.split(","), args.variants.split(",")
  # Seed-major: a stopped run has every row at fewer seeds rather than some rows complete and others missing.
  for seed in (int(s) for s in args.seeds.split(",")):
    for concept in concepts:
      for name in names:
        workdir = os.path.join(args.out, concept, f"{folder_prefix}{name}_seed{seed}")
        if not applies(variants[name], concept):
          log(f"== {concept} {name} seed {seed}: skipped, retain values {variants[name].retain_values} not {concept}'s")
          continue
        log(f"== {concept} {name} seed {seed}")
        config = variant_config(variants, name, concept, seed, args)
        if args.from_pieces and not os.path.isfile(os.path.join(workdir, "train.json")):
          continue
        timing = erasure_tiny.train_once(workdir, config)
        target = functools.partial(erasure_tiny.trained_pipeline, workdir, config)  # trained again if only pieces
        computes = erasure_tiny.attack_measures(base, functools.cache(target), concept, args, log)
        row = erasure_tiny.row_pieces(workdir, "", computes, args.refresh_verdicts)
        if not row:  # --from_pieces: trained, nothing measured yet
          continue
        rows.setdefault((concept, name), []).append(
          {**row, "train_seconds": timing["seconds"], "steady_train_seconds": timing["steady_seconds"]}
        )
        erasure_tiny.release_compiled()

  budget = max(int(b) for b in args.inversion_budgets.split(","))
  titles = " | ".join(t.format(budget=budget) for t, _, _ in RATE_COLUMNS)
  lines = [
    f"| concept | variant | ablation | {titles} | train s (no compile) | runs |",
    "|---" * (len(RATE_COLUMNS) + 5) + "|",
  ]
  for (concept, name), results in rows.items():
    cols = [erasure_tiny.fmt_rate(results, k, n) for _, k, n in RATE_COLUMNS]
    cols.append(fmt_seconds([r["steady_train_seconds"] for r in results]))
    lines.append(f"| {concept} | {name} | {variants[name].ablation} | {' | '.join(cols)} | {len(results)} |")
  table = "\n".join(lines) + "\n\n" + by_variant(rows, concepts, names, budget)
  print(table)
  print(f"this invocation: {time.perf_counter() - started:.0f} s (pieces already in {args.out} were not redone)")
  cost = erasure_tiny.cost_line([r for results in rows.values() for r in results])
  print(cost)
  with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
    f.write(f"{table}\n\n{cost}\n")
  with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
    json.dump({f"{c} | {n}": r for (c, n), r in rows.items()}, f, indent=2)
  for concept in concepts:
    curves = {}
    for (c, name), results in rows.items():
      if c == concept:
        points = np.array([r["cce_curve"] for r in results if "cce_curve" in r])  # [seeds, budgets, 2]
        if len(points):  # a row whose CCE was not measured has no curve
          curves[name] = points.mean(axis=0).tolist()
    budgets.plot(
      curves,
      os.path.join(args.out, f"{stem}_cce_asr_vs_budget_{concept}.png"),
      attacks.ConceptInversion.budget_label,
      title=f"concept inversion against erasures of '{concept}' (mean over seeds)",
    )


def main():
  run(VARIANTS, parse_args(__doc__, VARIANTS), "ablations")


if __name__ == "__main__":
  main()

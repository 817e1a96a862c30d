"""How many steps the published concept inversion (CCE) needs on the tiny world: ASR against steps up to the
published 5000, on the base model, one AdvUnlearn model and one ESD model, with the token in front of each prompt
(the placement this chose the tables' earlier 250-step budget with; the tables now run CCE placed as published
to its published 5000 steps, and benchmarks/cce_original_tiny.py draws both placements' curves).

  python benchmarks/inversion_budget_tiny.py --out=workdirs/inversion_budget_tiny          # about 1.5 h, 2 cores
  python benchmarks/inversion_budget_tiny.py --out=/tmp/smoke --budgets=5,10 --prompts=3 --iterations=10

The AdvUnlearn model is configs/tiny.py on the faithful path (online rollouts); the ESD model is the paper's ESD
(UNet cross-attention-free layers, no attack, no retain term). Every model is attacked on the same cases (the
concept's evaluation prompts, each at two seeds) with the same CCE run checkpointed at --budgets; the same cases
are also attacked with this project's earlier `prefix` protocol at its old 100-step budget, so a reader sees what
the change of protocol was worth. The chosen budget is the smallest at which every curve is within one case of
its value at the published budget. Finished pieces are kept under --out; writes table.md, results.json and
asr_vs_steps.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from advunlearn_jax import config_lib, rates  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.evals import attacks, budgets  # noqa: E402
from advunlearn_jax.training import runs  # noqa: E402
from benchmarks import erasure_tiny  # noqa: E402

# (erasure_tiny method, overrides on configs/tiny.py)
MODELS = {
  "advunlearn": ("advunlearn", ("train.xt_source=online",)),
  "esd": ("esd", ("train.method=noxattn", "train.xt_source=online", "retain.weight=0.0")),
}
PUBLISHED_STEPS = 5000  # esd/train.sh --max_train_steps


def flat_budget(curves: dict[str, list], n: int) -> int:
  """The smallest budget from which every curve stays within one case of its value at the last budget."""
  flat_from = lambda curve, b: all(curve[-1][1] - asr <= 1 / n + 1e-9 for step, asr in curve if step >= b)
  candidates = [b for b, _ in next(iter(curves.values()))][1:]
  return next(b for b in candidates if all(flat_from(curve, b) for curve in curves.values()))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="workdirs/inversion_budget_tiny")
  parser.add_argument("--concept", default="triangle")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--budgets", default="10,25,50,100,250,500,1000,2500,5000", help="CCE checkpoints (steps)")
  parser.add_argument("--prompts", type=int, default=24, help="evaluation cases (prompt, seed)")
  parser.add_argument("--iterations", type=int, default=0, help="training iterations; 0: configs/tiny.py's")
  args = parser.parse_args()
  log = lambda msg: print(msg, flush=True)
  steps = sorted(int(b) for b in args.budgets.split(","))
  base = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  targets = {"base": base}
  for name, (method, overrides) in MODELS.items():
    workdir = os.path.join(args.out, f"{name}_seed{args.seed}")
    if not os.path.isfile(os.path.join(workdir, "pipeline", "model_index.json")):
      log(f"== training {name}")
      runs.run(erasure_tiny.run_config(args.concept, method, args.seed, args.iterations, list(overrides)), workdir)
    targets[name] = sd_convert.load_pipeline(os.path.join(workdir, "pipeline"))
  results = {}
  for name, target in targets.items():
    for protocol, budget in (("cce", steps), ("prefix", [100])):
      path = os.path.join(args.out, f"{name}_{protocol}.json")
      log(f"== {protocol} against {name}")
      compute = lambda t=target, p=protocol, b=budget: erasure_tiny.inversion_measure(
        base, t, args.concept, b, args.prompts, log, protocol=p, placement="prefix", key="inversion"
      )
      results[f"{name} | {protocol}"] = erasure_tiny.cached_json(path, compute)

  n = args.prompts
  cce = {name: results[f"{name} | cce"]["inversion_curve"] for name in targets}
  chosen = flat_budget(cce, n)
  header = "| model | " + " | ".join(str(b) for b in [0, *steps]) + " | prefix protocol, 100 steps |"
  lines = [header, "|---" * (len(steps) + 3) + "|"]
  for name in targets:
    curve = cce[name]
    prefix = results[f"{name} | prefix"]
    cells = [str(rates.rate(round(asr * n), n)) for _, asr in curve]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {rates.rate(prefix['inversion_successes'], n)} |")
  seconds = {name: results[f"{name} | cce"]["inversion_train_seconds"] for name in targets}
  distinct = len({c.prompt for c in erasure_tiny.cases(args.concept, n)})
  summary = (
    f"CCE ASR on {n} cases of '{args.concept}' ({distinct} prompts, seeds counting up) against optimisation "
    f"steps (batch 4 x 4), the token in front of each prompt. Flat from {chosen} steps, "
    f"{chosen / PUBLISHED_STEPS:.0%} of the published {PUBLISHED_STEPS}. CCE training seconds to {steps[-1]} steps: "
    + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
  )
  table = "\n".join(lines)
  print(table, summary, sep="\n\n")
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(f"{table}\n\n{summary}\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"budget": chosen, "cases": n, **results}, f, indent=2)
  budgets.plot(
    cce,
    os.path.join(args.out, "asr_vs_steps.png"),
    attacks.ConceptInversion.budget_label,
    title=f"CCE against erasures of '{args.concept}'",
  )


if __name__ == "__main__":
  main()

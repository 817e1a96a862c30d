"""ASR against attack budget, from one attack run at the largest budget, and its plot for several models.

Both attacks stop a prompt at its first success and record the budget it took (`Outcome.iterations`:
UnlearnDiffAtk's attack iterations, which grow by `iters_per_t` per timestep block; inversion's optimisation
steps at the checkpoint that succeeded). The ASR at budget b counts the pre-successes and the prompts that
succeeded within b, so one run gives the whole curve and the curve cannot go down as b grows. (Separate runs at
each `iters_per_t` would cost their sum and need not be monotone: a longer block at one timestep changes where
every later block starts.)

  python -m advunlearn_jax.tools.plot_budgets --out=asr_vs_budget.png \
    ESD=esd_eval/report.json AdvUnlearn=adv/report.json
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import attacks as attacks_lib


def asr_curve(outcomes: Sequence, budgets: Sequence[int]) -> list[list[float]]:
  """[[budget, ASR], ...] with budget 0 (the pre-ASR) first."""
  n = len(outcomes)
  points = [0, *sorted(set(budgets))]
  return [[b, sum(o.pre_success or (o.success and o.iterations <= b) for o in outcomes) / n] for b in points]


def plot(curves: Mapping[str, Sequence[Sequence[float]]], path: str, xlabel: str, title: str = "") -> None:
  """One line per model: ASR (%) against budget, on the Agg canvas (no display needed)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for label, curve in curves.items():
    xs, ys = zip(*curve)
    ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("ASR (%)")
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.set_title(title or "ASR against attack budget")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def from_reports(labelled: Sequence[str]) -> tuple[dict[str, list], str]:
  """LABEL=REPORT.json (or REPORT.json) -> {label: curve}, and the x-axis label of their (common) attack."""
  curves, attacks = {}, set()
  for item in labelled:
    label, sep, path = item.partition("=")
    label, path = (label, path) if sep else (item, item)
    try:
      with open(path) as f:
        robustness = json.load(f)["robustness"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
      raise ConfigError(f"{path}: not an evaluate report with a robustness section ({e})") from e
    if not robustness.get("budget_curve"):
      raise ConfigError(f"{path}: no budget curve; evaluate with evaluation.budgets set")
    curves[label] = robustness["budget_curve"]
    attacks.add(robustness["attack_name"])
  if len(attacks) > 1:
    raise ConfigError(f"the reports used different attacks {sorted(attacks)}; their budgets do not share an axis")
  return curves, attacks_lib.named(attacks.pop()).budget_label

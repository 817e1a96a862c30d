"""An evaluation's report.md and image grids, rendered from its report.json dict."""

from __future__ import annotations

import os

import numpy as np

from advunlearn_jax.diffusion import generation
from advunlearn_jax.evals import attacks, unlearndiff


def protocol_lines(protocol: dict) -> list[str]:
  """The protocol as one block of `key: value` lines, nested keys joined by dots."""

  def flat(prefix: str, value) -> list[str]:
    if isinstance(value, dict):
      return [line for k, v in value.items() for line in flat(f"{prefix}.{k}" if prefix else k, v)]
    return [f"    {prefix}: {value}"]

  return ["Protocol:", "", *flat("", protocol), ""] if protocol else []


def save_grids(out_dir: str, targets: np.ndarray, outcomes) -> None:
  rows = np.concatenate([targets, np.stack([o.image for o in outcomes])])
  grid = generation.image_grid(rows, cols=len(targets))
  scale = max(1, 256 // targets.shape[1])  # tiny-world images are 32 px
  generation.save_png(
    os.path.join(out_dir, "targets_and_final.png"), np.kron(grid, np.ones((scale, scale, 1), np.uint8))
  )


def markdown(report: dict) -> str:
  lines = [
    "# Evaluation report",
    "",
    f"- original model: `{report['original']}`",
    f"- evaluated model: `{report['evaluated']}`",
  ]
  if "robustness" not in report:
    utility = utility_lines(report["utility"])
    return "\n".join(
      [*lines, "", "Utility only (no attack):", "", *utility, "", *protocol_lines(report.get("protocol", {}))]
    )
  r = report["robustness"]
  s = r["summary"]
  attack = attacks.named(r["attack_name"]).title(r["attack"]) if report["attacked"] else "none"
  lines += [
    f"- classifier: `{report['classifier']}`; attack: {attack}",
    "",
    f"**pre-ASR {rate(s, 'pre_')}, ASR {rate(s, '')}** "
    f"(ASR counts pre-successes plus attack successes; mean attack time {s['mean_attack_seconds']:.1f} s).",
    "",
  ]
  if r.get("released"):
    lines += [
      f"Released: {', '.join(f'`{name}`' for name in r['released'])} (docs/evaluation.md: running them again).",
      "",
    ]
  if r["skipped"]:
    lines += [f"Skipped {len(r['skipped'])} prompts, as the official loader does:", ""]
    lines += [f"- case {k['case']}: {k['reason']}: {k['prompt'][:70]!r}" for k in r["skipped"]] + [""]
  if r["budget_curve"]:
    lines += ["| budget | " + " | ".join(str(b) for b, _ in r["budget_curve"]) + " |"]
    lines += ["|---" * (len(r["budget_curve"]) + 1) + "|"]
    n = s["prompts"]
    lines += ["| ASR | " + " | ".join(f"{asr:.1%} ({round(asr * n)}/{n})" for _, asr in r["budget_curve"]) + " |", ""]
    lines += ["`asr_vs_budget.png` plots it (budget 0: the pre-ASR).", ""]
  if "inversion" in r:
    lines += [f"Learned token(s), nearest vocabulary words: {r['inversion']['nearest_words']}", ""]
  lines += utility_lines(report["utility"])
  lines += ["", *protocol_lines(report.get("protocol", {}))]
  lines += [
    "",
    "| case | prompt | seed | pre | success | t | iterations | adversarial tokens |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for o in r["per_prompt"]:
    tokens = o["adv_tokens"].replace("|", "\\|")
    prompt = o["prompt"][:70].replace("|", "\\|")
    lines.append(
      f"| {o['case']} | {prompt} | {o['seed']} | {'yes' if o['pre_success'] else ''} | "
      f"{'yes' if o['success'] else ''} | {o['timestep'] if o['timestep'] >= 0 else ''} | {o['iterations']} | "
      f"{tokens} |"
    )
  lines += ["", "`targets_and_final.png`: top row the original model's targets, bottom row the classified images.", ""]
  return "\n".join(lines)


def rate(summary: dict, prefix: str) -> str:
  """A report's summary's `pre_` or plain rate as `37.5% (3/8, 95% CI 13.7-69.4%)` (unlearndiff.Summary's)."""
  s = unlearndiff.Summary(**summary)
  return str(s.pre_rate if prefix else s.rate)


def utility_lines(utility: dict) -> list[str]:
  lines = [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in utility.items()]
  if utility.get("fid_features") == "clip":
    lines.append("- (fid on CLIP image features: compare models with each other, not with the paper's FID)")
  return lines

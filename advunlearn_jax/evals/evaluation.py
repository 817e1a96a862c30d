"""One evaluation of an unlearned model (the evaluate command's work): robustness unless utility only, then
utility, into OUT/report.json and report.md."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import attacks, budgets, classifiers, prompt_sets, robustness, utility
from advunlearn_jax.evals import report as report_lib


def evaluate(
  config: ml_collections.ConfigDict,
  out_dir: str,
  text_encoder: str = "",
  pipeline: str = "",
  attack: bool = True,
  utility_only: bool = False,
  log=print,
) -> dict:
  """Robustness (unless `utility_only`), then utility; writes OUT/report.json and report.md."""
  if text_encoder and pipeline:
    raise ConfigError("--text_encoder and --pipeline are both set; give one (a pipeline already has its encoder)")
  ev = config.evaluation
  if utility_only and not ev.captions:
    raise ConfigError("--utility_only: config.evaluation.captions is empty (e.g. coco_10k.csv)")
  if not utility_only:
    prompts = prompt_sets.from_config(
      ev.prompts_csv, ev.prompts, ev.seed, ev.guidance, ev.max_prompts, "prompts", column=ev.prompts_column
    )
    if not prompts:
      raise ConfigError("config.evaluation has no prompts: set evaluation.prompts_csv or evaluation.prompts")
    method = attacks.named(ev.attack)
    settings = attacks.settings(config)
    if attack:  # the room an attack needs; unattacked, any prompt renders (cut at 77 tokens)
      method.check_prompts(settings, prompts)
    if not ev.classifier:
      raise ConfigError(
        "config.evaluation.classifier is empty; e.g. nudenet, hf:/path/to/resnet-50:497 (church) or "
        "hf:/path/to/style-vit:vincent-van-gogh:3"
      )
    classifier = classifiers.make(ev.classifier)
  original_dir = sd_convert.resolve_pretrained(config.model.pretrained)
  evaluated_dir = sd_convert.resolve_pretrained(pipeline) if pipeline else original_dir
  if os.path.isfile(os.path.join(evaluated_dir, "model_index.json")) and sd_convert.is_sdxl_folder(evaluated_dir):
    if text_encoder:
      raise ConfigError(
        f"--text_encoder swaps SD's one text encoder; {original_dir} is an SDXL model with two: pass the run's "
        "--pipeline=WORKDIR/pipeline (both towers)"
      )
    if not utility_only:
      attacks.check_runs_on(method, evaluated_dir)
  if text_encoder:
    target = sd_convert.load_pipeline(evaluated_dir, text_encoder=text_encoder)
  else:
    target = sd_convert.load_either(evaluated_dir)
  report: dict[str, Any] = {"original": original_dir, "evaluated": text_encoder or evaluated_dir, "seconds": {}}
  if not utility_only:
    original = sd_convert.load_either(original_dir)
    t0 = time.perf_counter()
    result = robustness.robustness(original, target, prompts, classifier, config, attack=attack, log=log)
    per_prompt = [
      {"case": p.case, **{k: v for k, v in o._asdict().items() if k != "image"}}
      for p, o in zip(result["prompts"], result["outcomes"])
    ]
    report.update(
      classifier=ev.classifier,
      attacked=attack,
      protocol=robustness.protocol(config, classifier, result),
      robustness={
        "summary": result["summary"],
        "attack_name": result["attack_name"],
        "attack": result["attack"],
        "budget_curve": result["budget_curve"],
        "per_prompt": per_prompt,
        "skipped": result["skipped"],
        **({"inversion": result["inversion"]} if "inversion" in result else {}),
      },
    )
    report["seconds"]["robustness"] = time.perf_counter() - t0
    os.makedirs(out_dir, exist_ok=True)  # only now: a prompt set that fails its checks leaves no folder behind
    report_lib.save_grids(out_dir, result["targets"], result["outcomes"])
    method = attacks.named(result["attack_name"])
    report["robustness"]["released"] = method.release(out_dir, result["prompts"], result["run"], result["settings"])
    if result["budget_curve"]:
      curve = {report["evaluated"].rstrip("/").rsplit("/", 1)[-1]: result["budget_curve"]}
      budgets.plot(curve, os.path.join(out_dir, "asr_vs_budget.png"), attacks.named(result["attack_name"]).budget_label)
  t0 = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  report["utility"] = utility.measure(config, original_dir, target, out_dir, log=log)
  report["seconds"]["utility"] = time.perf_counter() - t0
  if ev.captions:
    report.setdefault("protocol", {})["utility"] = utility.protocol(config, report["utility"])
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report_lib.markdown(report))
  return report

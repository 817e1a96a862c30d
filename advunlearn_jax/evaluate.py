"""Robustness and utility of an unlearned model: `python -m advunlearn_jax.evaluate --config=CONFIG --out=DIR`.

  python -m advunlearn_jax.evaluate --config=configs/tiny.py --text_encoder=workdirs/tiny/text_encoder --out=DIR
  python -m advunlearn_jax.evaluate --config=configs/nudity.py --pipeline=workdirs/esd/pipeline \
      --config.evaluation.prompts_csv=nudity.csv --out=DIR

The original model is `config.model.pretrained`; the evaluated one is that model with `--text_encoder`
swapped in, or a whole `--pipeline` folder (for UNet methods), or, with neither, the original model itself.
Target images come from the original model; UnlearnDiffAtk (evals/unlearndiff.py) then attacks every prompt
of `config.evaluation` that the unattacked model does not already show. Writes report.md, report.json and
grids of the target, unattacked and final images. With `evaluation.captions` it runs the paper's utility
protocol (`--utility_only`: nothing else): one image per caption (sharded, resumable: evals/caption_images.py),
the CLIP score with `evaluation.clip_model` and the FID against `evaluation.real_images` on the FID Inception's
features after T2IBenchmark's preprocessing, as the paper (evals/fid.py); on the tiny world it adds the judge's
recognition of the retained values.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from advunlearn_jax import cli, compile_cache, config_lib
from advunlearn_jax.errors import ConfigError


def _define_flags():
  """Flags exist only when run as a script, so importing this module next to other CLIs does not clash."""
  global _CONFIG, _OUT, _TEXT_ENCODER, _PIPELINE, _NO_ATTACK, _UTILITY_ONLY, _COMPILATION_CACHE
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)
  _OUT = flags.DEFINE_string("out", None, "Folder for report.md, report.json and the image grids.")
  _TEXT_ENCODER = flags.DEFINE_string("text_encoder", "", "Unlearned text encoder folder (transformers layout).")
  _PIPELINE = flags.DEFINE_string("pipeline", "", "Unlearned diffusers pipeline folder (e.g. WORKDIR/pipeline).")
  _NO_ATTACK = flags.DEFINE_bool("no_attack", False, "Only the unattacked pass (pre-ASR).")
  _UTILITY_ONLY = flags.DEFINE_bool("utility_only", False, "Only the utility protocol: caption images, CLIP, FID.")
  _COMPILATION_CACHE = flags.DEFINE_string("compilation_cache", "{out}/xla_cache", compile_cache.FLAG_HELP)


def target_images(pipe, prompts, config: ml_collections.ConfigDict) -> np.ndarray:
  """The original model's image of each prompt at its own seed, at `evaluation.target_guidance` (7.5, as the
  official generate_dataset.py) or with 0 at the prompt's own guidance."""
  from advunlearn_jax.diffusion import generation

  ev = config.evaluation
  return np.concatenate(
    [
      generation.generate(
        pipe,
        [p.prompt],
        generation.initial_latents(pipe, 1, p.seed, ev.latents),
        scheduler=ev.target_scheduler,
        steps=ev.target_steps,
        guidance=ev.target_guidance or p.guidance,
      )
      for p in prompts
    ]
  )


def robustness(original, target, prompts, classifier, config, attack: bool = True, log=print) -> dict[str, Any]:
  """`evaluation.attack` on every prompt that passes `unlearndiff.screen` (checked before anything is
  generated): UnlearnDiffAtk prompt by prompt, or one concept inversion for all of them."""
  from advunlearn_jax import tokenizer as tok_lib
  from advunlearn_jax.evals import attacks, budgets, inversion, unlearndiff

  ev = config.evaluation
  cfg = attacks.config_from(config.evaluation)
  k = cfg.tokens if ev.attack == "inversion" else cfg.k
  tokenizer = tok_lib.load_tokenizer(target.tokenizer_dir)
  prompts, skipped = unlearndiff.screen(prompts, tokenizer, k, ev.max_prompt_tokens)
  for s in skipped:
    log(f"skipped case {s.case} ({s.reason}): {s.prompt[:60]!r}")
  if not prompts:
    raise ConfigError(f"every one of the {len(skipped)} evaluation prompts was skipped ({skipped[0].reason})")
  extra: dict[str, Any] = {}

  def progress(i: int, o) -> None:
    status = "pre-success" if o.pre_success else ("attack success" if o.success else "robust")
    log(f"[{i + 1}/{len(prompts)}] {status} after {o.iterations} iterations ({o.seconds:.1f}s): {o.prompt[:60]!r}")

  if ev.attack == "inversion":
    from advunlearn_jax.diffusion import generation

    images = inversion.concept_images(
      ev.inversion.images,
      cfg.max_images,
      generation.image_size(target),
      seed=config.seed,
      center_crop=cfg.protocol != "cce",
    )
    result = inversion.attack_prompts(
      target, prompts, images, classifier, cfg, attack=attack, seed=config.seed, log=log
    )
    outcomes, targets = result.outcomes, images[: len(prompts)]
    for i, o in enumerate(outcomes):  # one training serves every prompt: their outcomes arrive together
      progress(i, o)
    extra["inversion"] = {
      "images": len(images),
      "losses": result.losses,
      "nearest_words": {str(b): w for b, w in result.learned.items()},
      "train_seconds": result.train_seconds,
    }
  else:
    targets = target_images(original, prompts, config)
    outcomes = []
    for p, image in zip(prompts, targets):  # minutes per prompt on SD: report each as it ends
      o = unlearndiff.attack_prompt(
        target, p.prompt, image, classifier, cfg, seed=p.seed, guidance=p.guidance, attack=attack
      )
      progress(len(outcomes), o)
      outcomes.append(o)
  summary = unlearndiff.summarize(outcomes)
  return {
    "summary": {k: list(v) if isinstance(v, tuple) else v for k, v in summary._asdict().items()},  # as JSON reads it
    "outcomes": outcomes,
    "prompts": prompts,
    "skipped": [s._asdict() for s in skipped],
    "targets": targets,
    "attack_name": ev.attack,
    "attack": cfg.describe() if ev.attack == "inversion" else cfg._asdict(),
    "budget_curve": budgets.asr_curve(outcomes, ev.budgets) if ev.budgets and attack else [],
    **extra,
  }


def robustness_protocol(config: ml_collections.ConfigDict, classifier, result: dict) -> dict[str, Any]:
  """Every knob that decides the robustness numbers, for report.json and report.md's protocol block."""
  ev = config.evaluation
  sampler = result["attack"]
  seeds = sorted({p.seed for p in result["prompts"]})
  guidance = sorted({p.guidance for p in result["prompts"]})
  return {
    "classifier": {"spec": ev.classifier, **getattr(classifier, "protocol", {})},
    "classified_images": {
      "scheduler": sampler.get("scheduler"),
      "steps": sampler.get("sample_steps", sampler.get("steps")),
      "guidance": guidance,
      "seeds": seeds if len(seeds) <= 8 else f"{len(seeds)} distinct, per prompt",
      "latents": ev.latents,
    },
    "target_images": (
      {"scheduler": ev.target_scheduler, "steps": ev.target_steps, "guidance": ev.target_guidance or "per prompt"}
      if result["attack_name"] == "unlearndiff"
      else "none (inversion learns from evaluation.inversion.images)"
    ),
    "attack": {"name": result["attack_name"], **result["attack"]},
    "prompts": {
      "source": ev.prompts_csv or "inline",
      "evaluated": len(result["prompts"]),
      "skipped": len(result["skipped"]),
    },
  }


def utility_protocol(config: ml_collections.ConfigDict, utility: dict) -> dict[str, Any]:
  ev = config.evaluation
  out: dict[str, Any] = {
    "captions": ev.captions,
    "images": {
      "scheduler": ev.utility_scheduler,
      "steps": ev.utility_steps,
      "guidance": ev.utility_guidance,
      "latents": ev.latents,
    },
  }
  if "clip_score" in utility:
    out["clip_score"] = {"model": ev.clip_model}
  if "fid" in utility:
    out["fid"] = {
      "features": utility["fid_features"],
      "network": "FID Inception-v3, pytorch-fid's pt_inception-2015-12-05 weights"
      if utility["fid_features"] == "inception"
      else f"CLIP image features ({ev.clip_model})",
      "preprocess": utility["fid_preprocess"],
      "images": {
        "generated": utility["fid_images"][0],
        "real": utility["fid_images"][1],
        "real_source": ev.real_images,
      },
    }
  return out


def _protocol_lines(protocol: dict) -> list[str]:
  """The protocol as one block of `key: value` lines, nested keys joined by dots."""

  def flat(prefix: str, value) -> list[str]:
    if isinstance(value, dict):
      return [line for k, v in value.items() for line in flat(f"{prefix}.{k}" if prefix else k, v)]
    return [f"    {prefix}: {value}"]

  return ["Protocol:", "", *flat("", protocol), ""] if protocol else []


def _save_grids(out_dir: str, targets: np.ndarray, outcomes) -> None:
  from advunlearn_jax.diffusion import generation

  rows = np.concatenate([targets, np.stack([o.image for o in outcomes])])
  grid = generation.image_grid(rows, cols=len(targets))
  scale = max(1, 256 // targets.shape[1])  # tiny-world images are 32 px
  generation.save_png(
    os.path.join(out_dir, "targets_and_final.png"), np.kron(grid, np.ones((scale, scale, 1), np.uint8))
  )


def _markdown(report: dict) -> str:
  lines = [
    "# Evaluation report",
    "",
    f"- original model: `{report['original']}`",
    f"- evaluated model: `{report['evaluated']}`",
  ]
  if "robustness" not in report:
    utility_lines = _utility_lines(report["utility"])
    return "\n".join(
      [*lines, "", "Utility only (no attack):", "", *utility_lines, "", *_protocol_lines(report.get("protocol", {}))]
    )
  r = report["robustness"]
  s = r["summary"]
  a = r["attack"]
  if not report["attacked"]:
    attack = "none"
  elif r["attack_name"] == "inversion":
    name = "CCE concept inversion" if a["protocol"] == "cce" else "prefix concept inversion"
    attack = f"{name} ({a['tokens']} learned embeddings, {max(a['budgets'] or [a['steps']])} steps)"
  else:
    attack = f"UnlearnDiffAtk (k={a['k']}, {a['iters_per_t']} iterations x {len(a['timesteps'])} timesteps)"
  lines += [
    f"- classifier: `{report['classifier']}`; attack: {attack}",
    "",
    f"**pre-ASR {_rate(s, 'pre_')}, ASR {_rate(s, '')}** "
    f"(ASR counts pre-successes plus attack successes; mean attack time {s['mean_attack_seconds']:.1f} s).",
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
    lines += [f"Learned prefix, nearest vocabulary words: {r['inversion']['nearest_words']}", ""]
  lines += _utility_lines(report["utility"])
  lines += ["", *_protocol_lines(report.get("protocol", {}))]
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


def _rate(summary: dict, prefix: str) -> str:
  """A summary's `pre_` or plain rate as `37.5% (3/8, 95% CI 13.7-69.4%)` (evals/intervals.py)."""
  from advunlearn_jax.evals import intervals

  k = summary["pre_successes" if prefix else "successes"]
  return str(intervals.Rate(k, summary["prompts"], *summary[f"{prefix}asr_ci95"]))


def _utility_lines(utility: dict) -> list[str]:
  lines = [f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in utility.items()]
  if utility.get("fid_features") == "clip":
    lines.append("- (fid on CLIP image features: compare models with each other, not with the paper's FID)")
  return lines


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
  from advunlearn_jax.convert import diffusers as sd_convert
  from advunlearn_jax.evals import classifiers, prompt_sets

  if text_encoder and pipeline:
    raise ConfigError("--text_encoder and --pipeline are both set; give one (a pipeline already has its encoder)")
  ev = config.evaluation
  if utility_only and not ev.captions:
    raise ConfigError("--utility_only: config.evaluation.captions is empty (e.g. coco_10k.csv)")
  if not utility_only:
    prompts = prompt_sets.from_config(ev.prompts_csv, ev.prompts, ev.seed, ev.guidance, ev.max_prompts, "prompts")
    if not prompts:
      raise ConfigError("config.evaluation has no prompts: set evaluation.prompts_csv or evaluation.prompts")
    if not ev.classifier:
      raise ConfigError(
        "config.evaluation.classifier is empty; e.g. nudenet, hf:/path/to/resnet-50:497 (church) or "
        "hf:/path/to/style-vit:vincent-van-gogh:3"
      )
    classifier = classifiers.make(ev.classifier)
  original_dir = config_lib.resolve_pretrained(config.model.pretrained)
  evaluated_dir = pipeline or original_dir
  target = sd_convert.load_pipeline(evaluated_dir, text_encoder=text_encoder or None)
  report: dict[str, Any] = {"original": original_dir, "evaluated": text_encoder or evaluated_dir, "seconds": {}}
  if not utility_only:
    original = sd_convert.load_pipeline(original_dir)
    t0 = time.perf_counter()
    result = robustness(original, target, prompts, classifier, config, attack=attack, log=log)
    per_prompt = [
      {"case": p.case, **{k: v for k, v in o._asdict().items() if k != "image"}}
      for p, o in zip(result["prompts"], result["outcomes"])
    ]
    report.update(
      classifier=ev.classifier,
      attacked=attack,
      protocol=robustness_protocol(config, classifier, result),
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
    _save_grids(out_dir, result["targets"], result["outcomes"])
    if result["budget_curve"]:
      from advunlearn_jax.evals import budgets

      curve = {report["evaluated"].rstrip("/").rsplit("/", 1)[-1]: result["budget_curve"]}
      budgets.plot(curve, os.path.join(out_dir, "asr_vs_budget.png"), budgets.XLABELS[result["attack_name"]])
  t0 = time.perf_counter()
  os.makedirs(out_dir, exist_ok=True)
  report["utility"] = utility(config, original_dir, target, out_dir, log=log)
  report["seconds"]["utility"] = time.perf_counter() - t0
  if ev.captions:
    report.setdefault("protocol", {})["utility"] = utility_protocol(config, report["utility"])
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(_markdown(report))
  return report


def utility(config: ml_collections.ConfigDict, original_dir: str, target, out_dir: str, log=print) -> dict[str, Any]:
  """The paper's utility protocol (spec 6.2): one image per caption of `evaluation.captions` (kept in
  OUT/utility_images, resumable), the CLIP score with `evaluation.clip_model`, the FID against
  `evaluation.real_images` on the features `evaluation.fid` names; the tiny world's retained-value recognition."""
  from advunlearn_jax.evals import prompt_sets

  out: dict[str, Any] = {}
  ev = config.evaluation
  if (ev.clip_model or ev.real_images) and not ev.captions:
    raise ConfigError(
      "config.evaluation.clip_model / real_images score images of captions: set evaluation.captions "
      "(e.g. coco_10k.csv or tfds:coco_captions/2014:val)"
    )
  if ev.captions:
    from advunlearn_jax.diffusion import generation
    from advunlearn_jax.evals import caption_images

    captions = prompt_sets.from_config(ev.captions, (), ev.seed, ev.utility_guidance, ev.max_captions, "captions")
    # Scorers and real images are checked before the hours of generation; images are read only when scored.
    scorer = features = None
    if ev.clip_model:
      from advunlearn_jax.evals import clip_score

      scorer = clip_score.CLIPScorer(ev.clip_model)
    if ev.real_images:
      from advunlearn_jax.evals import fid

      real_images = fid.open_images(ev.real_images, "evaluation.real_images", ev.max_real_images)
      if len(real_images) < 2:
        raise ConfigError(f"config.evaluation.real_images={ev.real_images!r}: FID needs at least 2 images")
      features = fid.feature_extractor(ev.fid, ev.inception_weights, scorer, log, ev.fid_preprocess)
    hw = generation.image_size(target)
    store = caption_images.ImageStore(
      os.path.join(out_dir, "utility_images"),
      caption_images.manifest(captions, ev.utility_scheduler, ev.utility_steps, ev.latents),
      (hw, hw, 3),
      ev.utility_format,
    )
    t0 = time.perf_counter()
    made = caption_images.generate(
      target,
      captions,
      store,
      scheduler=ev.utility_scheduler,
      steps=ev.utility_steps,
      latents=ev.latents,
      per_device_batch=ev.utility_batch,
      log=log,
    )
    out["captions"] = len(captions)
    out["images_per_second"] = made / (time.perf_counter() - t0) if made else 0.0
    images = store.images()  # each scorer walks them in chunks: 10k images need not fit in memory
    if scorer is not None:
      out["clip_score"] = scorer.score(images, [c.prompt for c in captions])
    if features is not None:
      real = fid.statistics(features(real_images))
      out["fid"] = fid.frechet_distance(*fid.statistics(features(images)), *real)
      out["fid_features"] = features.name
      out["fid_preprocess"] = features.preprocess
      out["fid_images"] = [len(images), len(real_images)]  # generated, real
    samples = generation.image_grid(np.stack(images[:32]), cols=8)
    generation.save_png(os.path.join(out_dir, "utility_samples.png"), samples)
  if config.report.kind == "tiny_world":
    from advunlearn_jax.tiny import report as tiny_report

    results = tiny_report.write(
      os.path.join(out_dir, "tiny_world"),
      original_dir,
      target,
      config.concept.prompts,
      per_value=config.report.images_per_value,
      seed=config.seed + 1,
      erased_values=config.report.erased,
    )
    out.update({f"tiny_world_{k}": v for k, v in results["summary"].items()})
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config_lib.validate(config)
  cli.check_output_folder(_OUT.value, "out")
  compile_cache.enable(_COMPILATION_CACHE.value, out=_OUT.value)
  report = evaluate(
    config,
    _OUT.value,
    _TEXT_ENCODER.value,
    _PIPELINE.value,
    attack=not _NO_ATTACK.value,
    utility_only=_UTILITY_ONLY.value,
  )
  u = report["utility"]
  scores = [f"{k} {u[k]:.4f}" for k in ("fid", "clip_score") if k in u]
  if "fid" in u:
    scores[0] += f" ({u['fid_features']} features, {u['fid_preprocess']} preprocessing)"
  if "robustness" in report:
    s = report["robustness"]["summary"]
    scores.insert(0, f"pre-ASR {_rate(s, 'pre_')}, ASR {_rate(s, '')}")
  print(f"{'; '.join(scores) or 'no scores'}; report in {_OUT.value}/report.md")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config", "out"])
  cli.run(main, output_flags=("out",))

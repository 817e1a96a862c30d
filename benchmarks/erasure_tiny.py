"""The paper's claim on the tiny world: ESD-style erasure (no attack) vs AdvUnlearn, attacked by UnlearnDiffAtk.

  python benchmarks/erasure_tiny.py --out=workdirs/erasure_tiny                    # triangle + striped, 3 seeds
  python benchmarks/erasure_tiny.py --out=/tmp/smoke --seeds=0 --concepts=triangle --iterations=20 --quick

For each concept and seed, two text-encoder runs with identical config, seed and budget; the only difference
is the attack: ESD never attacks (warm-up covers every iteration), AdvUnlearn attacks after its warm-up. Both
are attacked with the same UnlearnDiffAtk budget on the concept's prompts; retain accuracy is the judge's
recognition of the other values of the concept's attribute. Then the plug-and-play check: the tiny UNet is
fine-tuned further with its text encoder frozen (the stand-in for SD v1.5), and each trained encoder is
plugged into it unchanged. Prints one table (mean +- std over seeds) and writes table.md and results.json.
Finished pieces are kept in --out, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import configs.tiny as tiny_config  # noqa: E402
from advunlearn_jax import config_lib, train  # noqa: E402
from advunlearn_jax import evaluate as evaluate_lib  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.evals import classifiers, prompt_sets  # noqa: E402
from advunlearn_jax.tiny import build, world  # noqa: E402
from advunlearn_jax.tiny import evaluate as tiny_eval  # noqa: E402
from advunlearn_jax.tiny import judge as judge_lib  # noqa: E402

METHODS = ("esd", "advunlearn")


def run_config(concept: str, method: str, seed: int, iterations: int, overrides: list[str]):
  config = tiny_config.get_config(concept)
  config.seed = seed
  for item in overrides:  # section.field=python-literal, e.g. attack.steps=30
    key, _, value = item.partition("=")
    section, field = key.split(".")
    config[section][field] = ast.literal_eval(value)
  config.samples.every = 0
  config.report.kind = ""
  if iterations:
    config.train.iterations = iterations
    config.train.warmup_iters = min(config.train.warmup_iters, iterations // 5)
    config.train.save_every = iterations
  if method == "esd":
    config.train.warmup_iters = config.train.iterations  # the attack never runs: plain ESD objective + retain
  return config


def retain_accuracy(pipe, concept: str, per_value: int, seed: int) -> float:
  """The judge's recognition of the other values of the concept's attribute on their own prompts."""
  kind, index = world.attribute_of(concept)
  others = [v for v in range(len(world.ATTRIBUTE_TYPES[kind])) if v != index]
  prompts = [p for v in others for p in world.attribute_prompts(kind, v, per_value)]
  labels = np.repeat(others, per_value)
  images = tiny_eval.generate(pipe, prompts, seed)
  return float(np.mean(judge_lib.predict(*judge_lib.load(tiny_eval.JUDGE_DIR), images)[kind] == labels))


def measure(original, target, concept: str, args, log) -> dict:
  config = tiny_config.get_config(concept)
  config.evaluation.prompts = config.evaluation.prompts[: args.prompts]
  if args.quick:
    config.evaluation.unlearndiff.iters_per_t = 5
    config.evaluation.unlearndiff.timesteps = (10, 490)
    config.evaluation.prompts = config.evaluation.prompts[:3]
  ev = config.evaluation
  prompts = prompt_sets.inline(ev.prompts, ev.seed, ev.guidance)
  classifier = classifiers.make(ev.classifier)
  t = time.perf_counter()
  result = evaluate_lib.robustness(original, target, prompts, classifier, config, log=log)
  s = result["summary"]
  return {
    "pre_asr": s["pre_asr"],
    "asr": s["asr"],
    "retain_acc": retain_accuracy(target, concept, args.per_value, seed=1000),
    "attack_seconds": time.perf_counter() - t,
    "adv_tokens": [o.adv_tokens for o in result["outcomes"]],
  }


def cached_json(path: str, compute) -> dict:
  """`compute()`'s result, kept in `path` (written atomically): a finished piece is never redone."""
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  value = compute()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)
  return value


def cached_measure(path: str, original, target, concept: str, args, log) -> dict:
  return cached_json(path, lambda: measure(original, target, concept, args, log))


def finetuned_unet(out: str, steps: int, seed: int) -> str:
  """The shipped UNet trained `steps` more under its frozen text tower, on freshly rendered images."""
  folder = os.path.join(out, "finetuned_sd")
  if os.path.isfile(os.path.join(folder, "model_index.json")):
    return folder
  base = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  images, attrs = build.render_pool(seed + 5000, 8192)
  latents = build.encode_means(base.vae_config, base.vae_params, images) * base.vae_config.scaling_factor
  text, unet = build.train_sd(
    latents, attrs, steps=steps, seed=seed + 5000, batch=64, lr=1e-4, init=(base.text_params, base.unet_params),
    train_text=False,
  )  # fmt: skip
  sd_convert.write_pipeline(
    folder,
    unet=(base.unet_config, unet),
    vae=(base.vae_config, base.vae_params),
    text_encoder=(base.text_config, text),
    tokenizer_dir=base.tokenizer_dir,
    schedule=base.schedule,
  )
  return folder


def fmt(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.1%}"
  return f"{np.mean(values):.1%} +- {np.std(values):.1%}"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="workdirs/erasure_tiny")
  parser.add_argument("--concepts", default="triangle,striped")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--iterations", type=int, default=0, help="0: configs/tiny.py's")
  parser.add_argument("--per_value", type=int, default=12, help="retain-accuracy images per retained value")
  parser.add_argument("--prompts", type=int, default=8, help="attack prompts per concept (of configs/tiny.py's 12)")
  parser.add_argument("--plug_and_play", default="triangle", help="concepts whose encoders are plugged in; '' skips")
  parser.add_argument("--finetune_steps", type=int, default=300, help="extra UNet steps under the frozen text tower")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument(
    "--set", action="append", default=[], help="config override for both methods, e.g. attack.steps=30"
  )
  parser.add_argument("--quick", action="store_true", help="a 3-prompt, 10-iteration attack (smoke test)")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  concepts = args.concepts.split(",")
  log = lambda msg: print(msg, flush=True)
  base = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)
  finetuned = None
  plug = set(filter(None, args.plug_and_play.split(",")))
  if plug:
    finetuned = sd_convert.load_pipeline(finetuned_unet(args.out, args.finetune_steps, seed=0))

  rows: dict[tuple[str, str], list[dict]] = {}
  for concept in concepts:
    add = lambda model, name, original, target, c=concept: rows.setdefault((c, model), []).append(
      cached_measure(name, original, target, c, args, log)
    )
    add("base", os.path.join(args.out, concept, "base.json"), base, base)
    if concept in plug:
      add("base, fine-tuned UNet", os.path.join(args.out, concept, "finetuned_base.json"), finetuned, finetuned)
    for method in args.methods.split(","):
      for seed in seeds:
        workdir = os.path.join(args.out, concept, f"{method}_seed{seed}")
        log(f"== {concept} {method} seed {seed}")
        if not os.path.isfile(os.path.join(workdir, "text_encoder", "config.json")):
          train.run(run_config(concept, method, seed, args.iterations, args.set), workdir)
        encoder = os.path.join(workdir, "text_encoder")
        target = sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR, text_encoder=encoder)
        add(method, os.path.join(workdir, "measure.json"), base, target)
        if concept in plug:
          plugged = sd_convert.load_pipeline(finetuned.root, text_encoder=encoder)
          add(
            f"{method}, plugged into fine-tuned UNet", os.path.join(workdir, "measure_plugged.json"), finetuned, plugged
          )

  lines = [
    "| concept | model | pre-ASR | ASR | retain acc | runs |",
    "|---|---|---|---|---|---|",
  ]
  for (concept, model), results in rows.items():
    cols = [fmt([r[k] for r in results]) for k in ("pre_asr", "asr", "retain_acc")]
    lines.append(f"| {concept} | {model} | {' | '.join(cols)} | {len(results)} |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({f"{c} | {m}": r for (c, m), r in rows.items()}, f, indent=2)


if __name__ == "__main__":
  main()

"""CCE as its authors run it, beside ours, on the README's default run: the same erased tiny model, the same 25
training images, the same 12 evaluation prompts, the same judge, ASR at the same budgets, and steps per second
of both on this machine.

  git clone https://github.com/NYU-DICE-Lab/circumventing-concept-erasure /tmp/cce
  python -m venv /tmp/cce_env && /tmp/cce_env/bin/pip install torch==2.13.0 transformers==4.28.1 \
      diffusers==0.18.2 accelerate==0.21.0 huggingface_hub==0.15.1 numpy==1.24.3 safetensors pillow
  python benchmarks/cce_original_tiny.py --original=/tmp/cce --original_python=/tmp/cce_env/bin/python
  python benchmarks/cce_original_tiny.py --original=/tmp/cce --original_python=... --budgets=10,20 --quick  # smoke

The original is `esd/concept_inversion.py`, unmodified, with `esd/train.sh`'s arguments (their era's packages,
from their environment.yml: transformers 5 has no `CLIPTextModel.text_model`, which the script freezes by name).
Three things differ from train.sh, each because this is a CPU: no `--mixed_precision=fp16` and no xformers, and
`--resolution` is the tiny model's 32. Its one torchvision call, a horizontal flip with probability 0.5
(concept_inversion.py:521), comes from a stand-in module written next to its output (`torch.rand(1) < p`, as
torchvision's), so torchvision is never installed. It saves the learned embedding every --budgets step
(`--save_steps`); each saved embedding is rendered by our renderer where the concept's word stood, exactly as
our own CCE's, and judged the same way. Steps per second: the original's from its saved files' times, ours from
our checkpoints' training seconds, both without the first checkpoint (our compile, their start-up).

Writes --out/results.json and --out/table.md; the README's default run is trained into --workdir if it is not
there (about 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import configs.tiny as tiny_config  # noqa: E402
from advunlearn_jax import intervals, runs  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.evals import budgets, classifiers, inversion, prompt_sets  # noqa: E402

# Their one torchvision transform, and the transformers/diffusers availability checks made before it exists, so
# neither library takes the stand-in for a real torchvision.
STAND_IN = """import runpy, sys, types
import torch
from PIL import Image
from transformers.utils import import_utils
import_utils.is_torchvision_available()
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa
from diffusers.optimization import get_scheduler  # noqa


class RandomHorizontalFlip:
  def __init__(self, p=0.5):
    self.p = p

  def __call__(self, img):
    return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else img


transforms = types.ModuleType("torchvision.transforms")
transforms.RandomHorizontalFlip = RandomHorizontalFlip
torchvision = types.ModuleType("torchvision")
torchvision.transforms = transforms
sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms})
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""
PLACEHOLDER = "<concept>"


def original_command(args, cfg: inversion.InversionConfig, model_dir: str, images_dir: str, out_dir: str) -> list:
  """esd/train.sh's arguments (lines 6-24), on our model and images."""
  return [
    args.original_python,
    os.path.join(out_dir, "stand_in.py"),
    os.path.join(args.original, "esd", "concept_inversion.py"),
    f"--pretrained_model_name_or_path={model_dir}",
    f"--train_data_dir={images_dir}",
    f"--learnable_property={cfg.templates}",
    f"--placeholder_token={PLACEHOLDER}",
    f"--initializer_token={cfg.initializer}",
    f"--resolution={args.resolution}",
    f"--train_batch_size={cfg.batch}",
    f"--gradient_accumulation_steps={cfg.accumulation}",
    f"--max_train_steps={max(cfg.checkpoints)}",
    f"--learning_rate={cfg.lr}",
    "--scale_lr",
    "--lr_scheduler=constant",
    "--lr_warmup_steps=0",
    f"--save_steps={math.gcd(*cfg.checkpoints)}",
    f"--checkpointing_steps={10 * max(cfg.checkpoints)}",  # no accelerate state: only the embeddings
    f"--output_dir={out_dir}",
    f"--num_train_images={cfg.max_images}",
    "--seed=0",
  ]


def run_original(args, cfg, model_dir: str, images: np.ndarray, out_dir: str, log) -> dict:
  """The authors' script to the last budget; its saved embedding at each budget and its steps per second."""
  from PIL import Image

  images_dir = os.path.join(out_dir, "images")
  os.makedirs(images_dir, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(os.path.join(images_dir, f"{i:02d}.png"))
  with open(os.path.join(out_dir, "stand_in.py"), "w") as f:
    f.write(STAND_IN)
  saved = lambda step: os.path.join(out_dir, f"learned_embeds-steps-{step}.bin")
  if not all(os.path.exists(saved(b)) for b in cfg.checkpoints):
    log(f"original: {' '.join(original_command(args, cfg, model_dir, images_dir, out_dir)[2:])}")
    t = time.perf_counter()
    with open(os.path.join(out_dir, "log.txt"), "w") as f:
      subprocess.run(original_command(args, cfg, model_dir, images_dir, out_dir), check=True, stdout=f, stderr=f)
    log(f"original: {time.perf_counter() - t:.0f} s")
  import torch

  first, last = cfg.checkpoints[0], cfg.checkpoints[-1]
  seconds = os.path.getmtime(saved(last)) - os.path.getmtime(saved(first))
  return {
    "embeddings": {b: torch.load(saved(b))[PLACEHOLDER].numpy() for b in cfg.checkpoints},
    "steps_per_second": (last - first) / seconds,
  }


def asr_row(outcomes, checkpoints) -> list[dict]:
  """Successes at each budget (0: unattacked), with their 95% Wilson intervals."""
  n = len(outcomes)
  row = [{"budget": b, "successes": round(asr * n), "cases": n} for b, asr in budgets.asr_curve(outcomes, checkpoints)]
  return [{**c, "interval": list(intervals.wilson(c["successes"], n))} for c in row]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--original", required=True, help="a clone of NYU-DICE-Lab/circumventing-concept-erasure")
  parser.add_argument("--original_python", default=sys.executable, help="an interpreter with their packages")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "tiny"), help="the README's default run")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "cce_original_tiny"))
  parser.add_argument("--concept", default="triangle")
  parser.add_argument("--budgets", default="10,25,50,100,250,500,1000,2500,5000", help="CCE steps")
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--quick", action="store_true", help="3 prompts (a smoke run)")
  args = parser.parse_args()
  log = lambda msg: print(msg, flush=True)

  config = tiny_config.get_config(args.concept)
  if not os.path.isdir(os.path.join(args.workdir, "pipeline")):
    log(f"training the README's default run into {args.workdir}")
    runs.run(config, args.workdir, show_progress=False)
  model_dir = os.path.join(args.workdir, "pipeline")
  target = sd_convert.load_pipeline(model_dir)
  ev = config.evaluation
  ev.attack, ev.budgets = "inversion", tuple(int(b) for b in args.budgets.split(","))
  prompts = prompt_sets.from_config("", ev.prompts, ev.seed, ev.guidance, 3 if args.quick else 0, "prompts")
  classifier = classifiers.make(ev.classifier)
  word = inversion.InversionConfig.from_config(config)
  images = inversion.concept_images(ev.inversion.images, word.max_images, args.resolution, seed=config.seed)
  os.makedirs(args.out, exist_ok=True)

  rows, speeds = {}, {}
  for placement in ("word", "prefix"):
    cfg = word._replace(placement=placement)
    result = inversion.attack_prompts(target, prompts, images, classifier, cfg, seed=config.seed, log=log)
    rows[f"ours, {placement}"] = asr_row(result.outcomes, cfg.checkpoints)
    at = result.seconds_at
    if len(at) > 1:  # a run that stopped at its first checkpoint has no compile-free seconds
      (b0, s0), (b1, s1) = min(at.items()), max(at.items())
      speeds[f"ours, {placement}"] = (b1 - b0) / (s1 - s0)
  original = run_original(args, word, model_dir, images, os.path.join(args.out, "original"), log)
  result = inversion.attack_prompts(
    target, prompts, images, classifier, word, seed=config.seed, log=log, learned_at=original["embeddings"].get
  )
  rows["original (esd/concept_inversion.py), word"] = asr_row(result.outcomes, word.checkpoints)
  speeds["original (esd/concept_inversion.py)"] = original["steps_per_second"]

  header = "| run | " + " | ".join(str(c["budget"]) for c in next(iter(rows.values()))) + " |"
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  cells = lambda row: " | ".join(f"{c['successes']}/{c['cases']}" for c in row)
  lines += [f"| {name} | {cells(row)} |" for name, row in rows.items()]
  lines += ["", "| run | CCE steps per second (4 x 4 images) |", "|---|---|"]
  lines += [f"| {name} | {s:.2f} |" for name, s in speeds.items()]
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"model": model_dir, "prompts": len(prompts), "rows": rows, "steps_per_second": speeds}, f, indent=2)


if __name__ == "__main__":
  main()

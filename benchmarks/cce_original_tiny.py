"""CCE as its authors run it, beside ours, on the README's default run: the same erased tiny model, the same 25
training images, the same 12 evaluation prompts, the same judge, ASR at the same budgets, and steps per second
of both on this machine.

  git clone https://github.com/NYU-DICE-Lab/circumventing-concept-erasure /tmp/cce
  python -m venv /tmp/cce_env && /tmp/cce_env/bin/pip install torch==2.13.0 transformers==4.28.1 \
      diffusers==0.18.2 accelerate==0.21.0 huggingface_hub==0.15.1 numpy==1.24.3 safetensors pillow
  python benchmarks/cce_original_tiny.py --original=/tmp/cce --original_python=/tmp/cce_env/bin/python
  python benchmarks/cce_original_tiny.py --original=/tmp/cce --original_python=... --workdir=/tmp/w --out=/tmp/o \
      --iterations=20 --budgets=10,20 --speed_steps=20 --quick   # a smoke run

The original is `esd/concept_inversion.py`, unmodified, with `esd/train.sh`'s arguments (their era's packages,
from their environment.yml: transformers 5 has no `CLIPTextModel.text_model`, which the script freezes by name;
our own environment needs torch too, to read its saved embeddings). What differs from train.sh: no
`--mixed_precision=fp16` and no xformers (this is a CPU); the tiny model's `--resolution=32`; the concept's
templates and initializer as configs/tiny.py sets them for our CCE (object, "shape"); `--seed` set, the
embedding saved at the budgets (`--save_steps`, no accelerate state, no full pipeline), `--max_train_steps` the
last budget. Its one torchvision call, a horizontal flip with probability 0.5
(concept_inversion.py:521), comes from a stand-in module written next to its output (`torch.rand(1) < p`, as
torchvision's), so torchvision is never installed. It saves the learned embedding every --budgets step
(`--save_steps`); each saved embedding is rendered by our renderer where the concept's word stood, exactly as
our own CCE's, and judged the same way, as the script trains; like ours, a prompt's attack stops at its first
success, and the script is stopped once every prompt has succeeded. Steps per second come from a separate
pass (--speed_steps), the two trainings alone and back to back: ours after one compiling step, the original's
between its saved files' times (its start-up excluded). Run it on an otherwise idle machine.

Writes --out/results.json and --out/table.md; the README's default run is trained into --workdir if it is not
there (about 5 minutes).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import configs.tiny as tiny_config  # noqa: E402
from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.evals import budgets, classifiers, inversion, prompt_sets  # noqa: E402
from advunlearn_jax.training import runs  # noqa: E402

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


def original_command(args, cfg, model_dir: str, images_dir: str, out_dir: str, seed: int) -> list:
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
    f"--seed={seed}",
  ]


class Original:
  """The authors' script training towards the last budget in the background. `embedding(step)` waits for the
  embedding it saves at that step; like ours, the attack stops at its first successes, so `close()` ends the
  script once nothing is left to render (or when it is done)."""

  def __init__(self, args, cfg, model_dir: str, images: np.ndarray, out_dir: str, log, seed: int = 0):
    from PIL import Image

    self.out_dir, self.checkpoints = out_dir, cfg.checkpoints
    shutil.rmtree(out_dir, ignore_errors=True)  # every run afresh: a file left by another is no step of this one
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    for i, image in enumerate(images):
      Image.fromarray(image).save(os.path.join(images_dir, f"{i:02d}.png"))
    with open(os.path.join(out_dir, "stand_in.py"), "w") as f:
      f.write(STAND_IN)
    command = original_command(args, cfg, model_dir, images_dir, out_dir, seed)
    log(f"original: {' '.join(command[2:])}")
    self.log_file = open(os.path.join(out_dir, "log.txt"), "w")  # noqa: SIM115 (closed by close())
    self.proc = subprocess.Popen(command, stdout=self.log_file, stderr=self.log_file)

  def saved(self, step: int) -> str:
    return os.path.join(self.out_dir, f"learned_embeds-steps-{step}.bin")

  def _later_saved(self, step: int) -> bool:
    """Whether the script has saved a step after `step` (every --save_steps), so that file is complete."""
    head = "learned_embeds-steps-"
    return any(int(n[len(head) : -4]) > step for n in os.listdir(self.out_dir) if n.startswith(head))

  def embedding(self, step: int) -> np.ndarray:
    """[1, D], once the script has saved it (the file complete: a later one exists, or the script ended)."""
    import torch

    while not (os.path.exists(self.saved(step)) and (self.proc.poll() is not None or self._later_saved(step))):
      if self.proc.poll() not in (None, 0):
        raise SystemExit(f"the original exited with status {self.proc.returncode}: {self.out_dir}/log.txt")
      if self.proc.poll() == 0 and not os.path.exists(self.saved(step)):
        raise SystemExit(f"the original ended without saving step {step}: {self.out_dir}/log.txt")
      self.prune()
      time.sleep(0.5)
    return torch.load(self.saved(step))[PLACEHOLDER].numpy()

  def prune(self) -> None:
    """Each saved file holds the whole embedding table (12.6 MB here), every --save_steps: keep the budgets'."""
    keep = {os.path.basename(self.saved(b)) for b in self.checkpoints}
    for name in os.listdir(self.out_dir):
      if name.startswith("learned_embeds-steps-") and name not in keep:
        os.remove(os.path.join(self.out_dir, name))

  def steps_per_second(self) -> float:
    """Between the first and the last budget's files: training alone, its start-up excluded."""
    first, last = self.checkpoints[0], self.checkpoints[-1]
    self.embedding(last)
    return (last - first) / (os.path.getmtime(self.saved(last)) - os.path.getmtime(self.saved(first)))

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.terminate()
    self.proc.wait()
    self.log_file.close()
    self.prune()


def our_steps_per_second(target, prompts, images, cfg, steps: int) -> float:
  """Our CCE training alone, `steps` steps after one compiling step."""
  import jax

  from advunlearn_jax.data import tokenizer as tok_lib

  tokenizer = tok_lib.load_tokenizer(target.tokenizer_dir)
  placed = inversion.placed_words(target, tokenizer, prompts, cfg)
  embeds, advance = inversion.trainer(target, tokenizer, placed, images, cfg, seed=0)
  embeds, _ = advance(embeds, 0, 1)
  t = time.perf_counter()
  embeds, _ = jax.block_until_ready(advance(embeds, 1, 1 + steps))
  return steps / (time.perf_counter() - t)


def asr_row(outcomes, checkpoints) -> list[dict]:
  """Successes at each budget (0: unattacked). No interval: every case of one training run shares its one learned
  embedding, so the cases are no independent draws; the runs (seeds) are."""
  n = len(outcomes)
  return [{"budget": b, "successes": round(asr * n), "cases": n} for b, asr in budgets.asr_curve(outcomes, checkpoints)]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--original", required=True, help="a clone of NYU-DICE-Lab/circumventing-concept-erasure")
  parser.add_argument("--original_python", default=sys.executable, help="an interpreter with their packages")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "workdirs", "tiny"), help="the README's default run")
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "cce_original_tiny"))
  parser.add_argument("--concept", default="triangle")
  parser.add_argument("--budgets", default="10,25,50,100,250,500,1000,2500,5000", help="CCE steps")
  parser.add_argument("--seeds", default="0,1,2,3", help="training seeds of both runs (word placement), pooled")
  parser.add_argument("--resolution", type=int, default=32)
  parser.add_argument("--iterations", type=int, default=0, help="training iterations if --workdir is trained here")
  parser.add_argument("--speed_steps", type=int, default=300, help="steps of each in the timing pass; 0: none")
  parser.add_argument("--quick", action="store_true", help="3 prompts (a smoke run)")
  args = parser.parse_args()
  log = lambda msg: print(msg, flush=True)

  config = tiny_config.get_config(args.concept)
  if not os.path.isdir(os.path.join(args.workdir, "pipeline")):
    log(f"training the README's default run into {args.workdir}")
    if args.iterations:  # a smoke run's model
      config.train.iterations, config.train.warmup_iters = args.iterations, args.iterations // 5
      config.train.save_every, config.report.kind = args.iterations, ""
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

  # Where ASR climbs from none to all within a few dozen steps, when it does depends on the training seed (the
  # data order, the noise): the word placement's rows sum several seeds of each run, and the table adds each
  # seed's counts. The prefix row, which runs to the last budget, is the first seed's.
  seeds = [int(s) for s in args.seeds.split(",")]
  ours, theirs, names = "ours, word", "original (esd/concept_inversion.py), word", {}
  by_seed: dict[str, list] = {ours: [], theirs: [], "ours, prefix": []}
  for seed in seeds:
    attack = functools.partial(inversion.attack_prompts, target, prompts, images, classifier, seed=seed, log=log)
    by_seed[ours].append(attack(word).outcomes)
    original = Original(args, word, model_dir, images, os.path.join(args.out, f"original_seed{seed}"), log, seed)
    try:
      by_seed[theirs].append(attack(word, learned_at=original.embedding).outcomes)
    finally:
      original.close()
    if seed == seeds[0]:
      by_seed["ours, prefix"].append(attack(word._replace(placement="prefix")).outcomes)
  for name, outcomes in by_seed.items():
    names[name] = f"{name} (seed {seeds[0]})" if len(outcomes) == 1 else f"{name} ({len(outcomes)} seeds, pooled)"
  rows = {names[k]: asr_row([o for run in v for o in run], word.checkpoints) for k, v in by_seed.items()}
  per_seed = {k: [asr_row(run, word.checkpoints) for run in v] for k, v in by_seed.items()}
  # Speed: both trainings alone, back to back, on this machine (the ASR runs above stop and render in between).
  speeds = {}
  if args.speed_steps:
    # Their script saves at multiples of the budgets' divisor: (N, 2N) saves once in the timed stretch, as ours none.
    timed = word._replace(budgets=(args.speed_steps, 2 * args.speed_steps))
    speeds["ours"] = our_steps_per_second(target, prompts, images, timed, args.speed_steps)
    timing_dir = os.path.join(args.out, "original_timing")
    timing = Original(args, timed, model_dir, images, timing_dir, log)
    try:
      speeds["original (esd/concept_inversion.py)"] = timing.steps_per_second()
    finally:
      timing.close()
    log(f"steps per second: {speeds}")

  header = "| run | " + " | ".join(str(c["budget"]) for c in next(iter(rows.values()))) + " |"
  lines = [header, "|---" * (header.count("|") - 1) + "|"]
  cells = lambda row: " | ".join(f"{c['successes']}/{c['cases']}" for c in row)
  for name, row in rows.items():
    lines.append(f"| {name} | {cells(row)} |")
    runs_of = per_seed[next(k for k in by_seed if name.startswith(k))]
    if len(runs_of) > 1:
      lines += [f"| seed {seed} | {cells(run)} |" for seed, run in zip(seeds, runs_of, strict=True)]
  lines += ["", "| run | CCE steps per second (4 x 4 images) |", "|---|---|"]
  lines += [f"| {name} | {s:.2f} |" for name, s in speeds.items()]
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(args.out, "results.json"), "w") as f:
    report = {"model": model_dir, "prompts": len(prompts), "seeds": seeds, "rows": rows, "per_seed": per_seed}
    json.dump({**report, "steps_per_second": speeds}, f, indent=2)


if __name__ == "__main__":
  main()

"""Utility-image generation: images/s of our sharded sampler (evals/caption_images.py) against diffusers'
`StableDiffusionPipeline` on the same pipeline folder, scheduler, steps, guidance, batch and start latents,
measured in one run.

  python benchmarks/generate.py                                   # the tiny pipeline, LMS 50 steps, CPU-sized
  python benchmarks/generate.py --pretrained=CompVis/stable-diffusion-v1-4 --images=64 --batch=8 --steps=100

Both sides make `--images` images in batches of `--batch` per device (diffusers: one device), from the same
per-caption start latents, and end with uint8 images in host memory (ours also in an `npy` store, as
`evaluate --utility_only` keeps them). Each side is warmed up on one batch first (our compile time is reported
separately), then timed `--repeats` times; the median counts. The images of the two sides are compared too: the
same start latents must give the same pictures (max and mean absolute uint8 difference), or the ratio would not
compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from advunlearn_jax.convert import diffusers as sd_convert  # noqa: E402
from advunlearn_jax.diffusion import generation  # noqa: E402
from advunlearn_jax.evals import caption_images, prompt_sets  # noqa: E402

WORDS = ("a red triangle", "a blue circle", "a green square", "a photo of a church", "a yellow star", "a cat")


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--pretrained", default="tiny", help="diffusers folder or hub id; tiny: the shipped model")
  p.add_argument("--images", type=int, default=32)
  p.add_argument("--batch", type=int, default=8, help="images per device per batch")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--scheduler", default="lms", choices=["lms", "ddim"])
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--no_torch", action="store_true", help="only our side")
  p.add_argument("--json", default=None)
  return p.parse_args()


def ours(pipe, captions, args, folder: str) -> tuple[np.ndarray, float]:
  hw = generation.image_size(pipe)
  store = caption_images.ImageStore(
    folder, caption_images.manifest(captions, args.scheduler, args.steps, "jax"), (hw, hw, 3), "npy"
  )
  t0 = time.perf_counter()
  caption_images.generate(
    pipe, captions, store, scheduler=args.scheduler, steps=args.steps, per_device_batch=args.batch, progress=False
  )
  return np.stack(store.images()), time.perf_counter() - t0


def diffusers_side(root, pipe, captions, args) -> tuple[np.ndarray, float]:
  import torch
  from diffusers import DDIMScheduler, LMSDiscreteScheduler, StableDiffusionPipeline

  sd = StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)
  scheduler = LMSDiscreteScheduler if args.scheduler == "lms" else DDIMScheduler
  sd.scheduler = scheduler.from_config(sd.scheduler.config)
  sd.set_progress_bar_config(disable=True)
  start = np.concatenate([np.asarray(generation.initial_latents(pipe, 1, c.seed)) for c in captions])
  start = torch.from_numpy(start.transpose(0, 3, 1, 2).copy())  # NHWC -> diffusers' NCHW
  t0 = time.perf_counter()
  out = []
  with torch.no_grad():
    for k in range(0, len(captions), args.batch):
      images = sd(
        prompt=[c.prompt for c in captions[k : k + args.batch]],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        latents=start[k : k + args.batch],
        output_type="np",
      ).images
      out.append((images * 255).round().astype(np.uint8))
  return np.concatenate(out), time.perf_counter() - t0


def median_run(fn, repeats):
  runs = [fn() for _ in range(repeats)]
  return runs[0][0], float(np.median([seconds for _, seconds in runs]))


def main():
  args = parse_args()
  root = sd_convert.resolve_pretrained(args.pretrained)
  pipe = sd_convert.load_pipeline(root)
  devices = jax.device_count()
  per_call = args.batch * devices
  captions = prompt_sets.inline([WORDS[i % len(WORDS)] for i in range(args.images)], seed=0, guidance=args.guidance)
  print(
    f"backend={jax.default_backend()} devices={devices} {args.pretrained}: {args.images} images, "
    f"{args.scheduler} {args.steps} steps, guidance {args.guidance}, batch {args.batch}/device",
    flush=True,
  )
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    ours(pipe, captions[:per_call], args, os.path.join(tmp, "warmup"))
    compile_s = time.perf_counter() - t0
    counter = iter(range(args.repeats))
    our_images, our_s = median_run(
      lambda: ours(pipe, captions, args, os.path.join(tmp, f"run{next(counter)}")), args.repeats
    )
  result = {
    "images": args.images,
    "steps": args.steps,
    "devices": devices,
    "ours_s": our_s,
    "ours_images_per_s": args.images / our_s,
    "ours_warmup_s": compile_s,
  }
  print(
    f"ours:      {result['ours_images_per_s']:8.2f} images/s ({our_s:.2f} s; warm-up incl. compile {compile_s:.1f} s)"
  )
  if not args.no_torch:
    diffusers_side(root, pipe, captions[: args.batch], args)  # warm-up
    theirs, their_s = median_run(lambda: diffusers_side(root, pipe, captions, args), args.repeats)
    diff = np.abs(our_images.astype(int) - theirs.astype(int))
    result.update(
      diffusers_s=their_s,
      diffusers_images_per_s=args.images / their_s,
      speedup=their_s / our_s,
      max_abs_diff=int(diff.max()),
      mean_abs_diff=float(diff.mean()),
    )
    print(f"diffusers: {result['diffusers_images_per_s']:8.2f} images/s ({their_s:.2f} s)")
    print(f"images: max |ours - diffusers| = {diff.max()} / 255, mean {diff.mean():.3f}")
    print(f"speed-up ours vs diffusers: {result['speedup']:.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()

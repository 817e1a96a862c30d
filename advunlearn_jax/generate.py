"""Generate images with a (possibly unlearned) Stable Diffusion pipeline: SD 1.x/2.x, or SDXL (a folder whose UNet
takes SDXL's added conditioning, sampled as diffusers' StableDiffusionXLPipeline samples it).

  python -m advunlearn_jax.generate --pretrained=DIR_OR_ID_OR_tiny --prompt="a photo of a church" \
      [--text_encoder=DIR] [--seed=0 --seed=1] [--steps=50] [--guidance=7.5] [--scheduler=lms|ddim] \
      [--latents=FILE.npy] --out=DIR

Writes one PNG per prompt and seed (`p{prompt}_s{seed}.png`), `grid.png` and `prompts.json`.
`--text_encoder` swaps in another encoder for both the conditional and the unconditional branch, as the
reference's evaluation does (SD 1.x/2.x only). `--latents` holds initial latents in diffusers' layout, [B, 4, h, w] or
[4, h, w] (shared by every prompt), so results can be compared with other implementations.
"""

from __future__ import annotations

import json
import math
import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from advunlearn_jax import cli
from advunlearn_jax.convert.diffusers import is_sdxl_folder, load_pipeline, load_sdxl_pipeline, resolve_pretrained
from advunlearn_jax.diffusion import generation
from advunlearn_jax.diffusion.sampling import SCHEDULERS

_PRETRAINED = flags.DEFINE_string("pretrained", None, "diffusers pipeline folder or hub id")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "prompt; repeat the flag for several")
_TEXT_ENCODER = flags.DEFINE_string("text_encoder", None, "CLIPTextModel folder replacing the pipeline's")
_SEED = flags.DEFINE_multi_integer("seed", [0], "seed(s) for the initial latents")
_STEPS = flags.DEFINE_integer("steps", 50, "denoising steps")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
_SCHEDULER = flags.DEFINE_enum("scheduler", "lms", list(SCHEDULERS), "sampler")
_LATENTS = flags.DEFINE_string("latents", None, ".npy initial latents, NCHW (diffusers layout)")
_OUT = flags.DEFINE_string("out", None, "output folder")


def load_latents(path: str, n: int, shape_nhwc: tuple[int, int, int]) -> jnp.ndarray:
  try:
    latents = np.load(path, allow_pickle=False).astype(np.float32)
  except (ValueError, OSError) as e:
    raise app.UsageError(f"--latents={path}: not a .npy array ({e})") from e
  if latents.ndim == 3:
    latents = np.broadcast_to(latents, (n, *latents.shape))
  expected = (shape_nhwc[2], shape_nhwc[0], shape_nhwc[1])
  if latents.ndim != 4 or latents.shape[0] != n or latents.shape[1:] != expected:
    raise app.UsageError(
      f"{path}: latents of shape {latents.shape}; expected [{n}, {', '.join(map(str, expected))}]"
      " (NCHW, one per prompt) or the same without the batch axis"
    )
  return jnp.asarray(latents.transpose(0, 2, 3, 1))


def main(argv):
  del argv
  if not _PROMPT.value:
    raise app.UsageError("give at least one --prompt")
  if _STEPS.value < 1:
    raise app.UsageError(f"--steps={_STEPS.value}: give at least 1 denoising step")
  if not math.isfinite(_GUIDANCE.value) or _GUIDANCE.value < 0:  # NaN guidance draws black images
    raise app.UsageError(f"--guidance={_GUIDANCE.value}: expected a finite scale >= 0")
  cli.check_output_folder(_OUT.value, "out")
  if _LATENTS.value and not os.path.isfile(_LATENTS.value):
    raise app.UsageError(f"--latents={_LATENTS.value}: no such file")
  root = resolve_pretrained(_PRETRAINED.value)
  if is_sdxl_folder(root):
    if _TEXT_ENCODER.value:
      raise app.UsageError("--text_encoder swaps SD's one text encoder; an SDXL pipeline conditions on two")
    pipe = load_sdxl_pipeline(root)
  else:
    pipe = load_pipeline(root, text_encoder=_TEXT_ENCODER.value)
  prompts = list(_PROMPT.value)
  hw, c = pipe.unet_config.sample_size, pipe.unet_config.in_channels
  if _LATENTS.value:  # checked before the first image is drawn
    load_latents(_LATENTS.value, len(prompts), (hw, hw, c))
  images, names = [], []
  seeds = _SEED.value if not _LATENTS.value else [None]
  for seed in seeds:
    if _LATENTS.value:
      latents = load_latents(_LATENTS.value, len(prompts), (hw, hw, c))
    else:
      latents = generation.initial_latents(pipe, len(prompts), seed)
    batch = generation.generate(
      pipe, prompts, latents, scheduler=_SCHEDULER.value, steps=_STEPS.value, guidance=_GUIDANCE.value, progress=True
    )
    for i, image in enumerate(batch):
      names.append(f"p{i}_s{'latents' if seed is None else seed}.png")
      images.append(image)
  os.makedirs(_OUT.value, exist_ok=True)
  for name, image in zip(names, images):
    generation.save_png(os.path.join(_OUT.value, name), image)
  generation.save_png(os.path.join(_OUT.value, "grid.png"), generation.image_grid(np.stack(images), cols=len(prompts)))
  with open(os.path.join(_OUT.value, "prompts.json"), "w") as f:
    json.dump(
      {
        "prompts": prompts,
        "files": names,
        "scheduler": _SCHEDULER.value,
        "steps": _STEPS.value,
        "guidance": _GUIDANCE.value,
        "text_encoder": _TEXT_ENCODER.value,
      },
      f,
      indent=2,
    )
  print(f"wrote {len(images)} images and grid.png to {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["pretrained", "out"])
  cli.run(main, output_flags=("out",))

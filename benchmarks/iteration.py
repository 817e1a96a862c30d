"""Seconds per AdvUnlearn outer iteration (after warm-up: attack + defender step): JAX online, JAX bank, and the
plain PyTorch transcription of the reference, in one run on the same weights; prints ratios.

  python benchmarks/iteration.py --size=tiny            # CPU-sized tiny random models (the default)
  python benchmarks/iteration.py --size=sd14 --iters=3  # SD v1.4 UNet + CLIP-L with random weights (GPU)

`--no_torch` skips the PyTorch baseline (it needs torch + diffusers + transformers). Bank build time is
reported separately: it is paid once per run, not per iteration.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from advunlearn_jax import tokenizer as tok_lib  # noqa: E402
from advunlearn_jax.diffusion.schedule import ScheduleConfig  # noqa: E402
from advunlearn_jax.models import clip_text, presets  # noqa: E402
from advunlearn_jax.models import unet as unet_lib  # noqa: E402
from advunlearn_jax.unlearn import attack, retain, trainable  # noqa: E402
from advunlearn_jax.unlearn import bank as bank_lib  # noqa: E402
from advunlearn_jax.unlearn import frozen as frozen_lib  # noqa: E402
from advunlearn_jax.unlearn import step as step_lib  # noqa: E402


def configs(size):
  if size == "sd14":
    return clip_text.CLIPTextConfig(), unet_lib.UNetConfig.from_dict(presets.SD14_UNET)
  clip = clip_text.CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
  )
  unet = unet_lib.UNetConfig(
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    num_attention_heads=(4, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=16,
  )
  return clip, unet


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="tiny", choices=["tiny", "sd14"])
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--attack_steps", type=int, default=30)
  p.add_argument("--retain_batch", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--no_torch", action="store_true")
  return p.parse_args()


def main():
  args = parse_args()
  clip_cfg, unet_cfg = configs(args.size)
  hw = unet_cfg.sample_size
  print(
    f"backend={jax.default_backend()} size={args.size} latents {hw}x{hw} attack_steps={args.attack_steps} "
    f"retain_batch={args.retain_batch} dtype={args.dtype} remat={args.remat}",
    flush=True,
  )
  k1, k2 = jax.random.split(jax.random.key(0))
  clip_params = clip_text.init_params(clip_cfg, k1)
  unet_params = jax.jit(unet_lib.UNet2DConditionModel(unet_cfg).init)(
    k2, jnp.zeros((1, hw, hw, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, unet_cfg.cross_attention_dim))
  )["params"]
  tokenizer = tok_lib.load_tokenizer()
  retain_prompts = list(retain.DEFAULT_PROMPTS[:16])
  frozen, k = frozen_lib.build(
    clip_config=clip_cfg,
    clip_params=clip_params,
    unet_params=unet_params,
    tokenizer=tokenizer,
    concepts=["nudity"],
    retain_prompts=retain_prompts,
    attack_type="prefix_k",
    num_tokens=1,
    faithful_word_split=False,
    schedule=ScheduleConfig(),
  )
  dtype = jnp.dtype(args.dtype)
  models = step_lib.Models(
    clip_text.CLIPTextModel(clip_cfg, dtype=dtype),
    unet_lib.UNet2DConditionModel(unet_cfg, dtype, args.remat),
    trainable.selected_paths(trainable.text_encoder_mask(clip_params, "text_encoder_full")),
    trainable.selected_paths(trainable.unet_mask(unet_params, "text_encoder_full")),
  )
  cfg = step_lib.StepConfig(
    latent_hw=hw,
    num_tokens=k,
    retain_batch=args.retain_batch,
    retain_weight=0.3,
    attack=attack.AttackConfig(steps=args.attack_steps),
  )
  step = jax.jit(step_lib.train_step, static_argnums=(0, 1, 5), donate_argnums=(2,))

  def time_jax(bank):
    state = step_lib.init_state(cfg, models, frozen)
    idx = jnp.arange(args.retain_batch, dtype=jnp.int32)
    t0 = time.perf_counter()
    state, m = step(cfg, models, state, frozen, step_lib.Batch(idx, jax.random.key(0)), True, bank)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for i in range(args.iters):
      t0 = time.perf_counter()
      state, m = step(cfg, models, state, frozen, step_lib.Batch(idx, jax.random.key(i + 1)), True, bank)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    return first, float(np.mean(times))

  results = {}
  first, per_it = time_jax(None)
  results["jax online"] = per_it
  print(f"jax online : {per_it:8.3f} s/it (first call incl. compile {first:.1f} s)", flush=True)
  t0 = time.perf_counter()
  bank = bank_lib.build(
    models.unet,
    frozen.unet,
    frozen,
    jax.random.key(1),
    concept_trajectories=8,
    retain_trajectories=1,
    latent_shape=(hw, hw, 4),
    guidance=3.0,
  )
  jax.block_until_ready(bank)
  print(
    f"bank build : {time.perf_counter() - t0:8.3f} s (once per run: 8 concept + {len(retain_prompts)} retain rollouts)",
    flush=True,
  )
  first, per_it = time_jax(bank)
  results["jax bank"] = per_it
  print(f"jax bank   : {per_it:8.3f} s/it (first call incl. compile {first:.1f} s)", flush=True)

  if not args.no_torch:
    results["pytorch"] = time_torch(args, clip_cfg, unet_cfg, clip_params, unet_params, frozen, k)
    print(f"pytorch    : {results['pytorch']:8.3f} s/it (reference transcription)", flush=True)
    for name in ("jax online", "jax bank"):
      print(f"speed-up {name} vs pytorch: {results['pytorch'] / results[name]:.2f}x")
  print(f"speed-up jax bank vs jax online: {results['jax online'] / results['jax bank']:.2f}x")


def time_torch(args, clip_cfg, unet_cfg, clip_params, unet_params, frozen, k):
  import diffusers
  import torch
  import transformers

  from advunlearn_jax.convert import clip_text as clip_convert
  from advunlearn_jax.convert import torch_layout
  from tests import reference_torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  unet = diffusers.UNet2DConditionModel(
    **{k: v for k, v in unet_cfg.to_diffusers_dict().items() if not k.startswith("_")}
  ).eval()
  state = torch_layout.flax_to_torch(unet_params, list_names=unet_lib.LIST_NAMES)
  unet.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  hf = transformers.CLIPTextConfig(**clip_cfg.to_transformers_dict())
  clips = []
  for _ in range(2):
    model = transformers.CLIPTextModel(hf).eval()
    model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in clip_convert.state_dict(clip_params, "").items()}, strict=False
    )
    clips.append(model.to(device))
  unet = unet.to(device)
  hw = unet_cfg.sample_size
  rng = np.random.default_rng(0)

  def draw(n):
    t_enc = int(rng.integers(0, 50))
    t_ddpm = int(rng.integers(20 * t_enc, 20 * t_enc + 20))
    return reference_torch.Draw(t_enc, t_ddpm, torch.randn(n, 4, hw, hw, device=device))

  ids_c = torch.from_numpy(np.asarray(frozen.concept_ids)).long().to(device)
  retain_ids = torch.from_numpy(np.asarray(frozen.retain_ids[: args.retain_batch])).long().to(device)
  times = []
  for _ in range(args.iters + 1):
    draws = reference_torch.Draws(
      [int(rng.integers(0, 49408))],
      [draw(1) for _ in range(args.attack_steps)],
      draw(1),
      torch.randn(args.retain_batch, 4, hw, hw, device=device),
    )
    t0 = time.perf_counter()
    reference_torch.iteration(
      unet,
      clips[0],
      clips[1],
      ids_c,
      2,
      retain_ids,
      draws,
      attack_steps=args.attack_steps,
      attack_lr=1e-3,
      lr=1e-5,
      retain_weight=0.3,
    )
    if device == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  return float(np.mean(times[1:]))


if __name__ == "__main__":
  main()

"""Seconds per AdvUnlearn outer iteration (after warm-up: attack + defender step): JAX online, JAX bank, and the
plain PyTorch transcription of the reference, in one run on the same weights; prints ratios.

  python benchmarks/iteration.py --size=tiny            # CPU-sized tiny random models (the default)
  python benchmarks/iteration.py --size=sd14 --iters=3  # SD v1.4 UNet + CLIP-L with random weights (GPU)
  python benchmarks/iteration.py --size=sd14 --memory_only --remat=full   # compile only: memory on any machine

`--no_torch` skips the PyTorch baseline (it needs torch + diffusers + transformers). On GPUs its fp32 matmuls
run in TF32, the arithmetic of JAX's default precision there, so the ratio compares like with like
(`--torch_matmul_precision=highest`: PyTorch's own default, as the reference runs). Bank build time is reported
separately: it is paid once per run, not per iteration.

Also per JAX mode: compile time; memory, as XLA's compiled memory analysis (arguments + outputs + temporaries,
every backend) and the device's peak bytes in use (GPU/TPU); and MFU. XLA's cost analysis counts a loop body
once, and an iteration is mostly loops (attack steps, DDIM rollouts), so the FLOPs are counted as UNet
forward-equivalents of the algorithm (`unet_forwards`: a backward pass is 2 forwards; rollouts run a CFG pair
per DDIM step, t_enc uniform over 0..49) times one UNet forward's FLOPs from cost analysis; the text encoder is
left out (under 3% of the UNet at SD size). Peak: `--peak_tflops`, default the H200's dense 989 (bf16) and 494
(fp32 as TF32) on GPUs.
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
from advunlearn_jax.models import clip_text  # noqa: E402
from advunlearn_jax.models import unet as unet_lib  # noqa: E402
from advunlearn_jax.unlearn import attack, retain, trainable  # noqa: E402
from advunlearn_jax.unlearn import bank as bank_lib  # noqa: E402
from advunlearn_jax.unlearn import frozen as frozen_lib  # noqa: E402
from advunlearn_jax.unlearn import step as step_lib  # noqa: E402
from benchmarks import setups, torch_unet  # noqa: E402

MEAN_ROLLOUT_STEPS = 24.5  # t_enc ~ U{0..49}: DDIM steps of a partial rollout, on average


def unet_forwards(bank: bool, attack_steps: int, retain_batch: int, concept_batch: int = 1) -> float:
  """Batch-1 UNet forward-equivalents of one attacking iteration (spec 2.3-2.4)."""
  rollout = 0.0 if bank else 2 * MEAN_ROLLOUT_STEPS  # CFG: a conditional and an unconditional pass per step
  attack = attack_steps * (rollout + 1 + 3)  # x_t, e_p, then e_adv forward + backward to the prompt
  concept = concept_batch * (rollout + 2 + 3)  # x_t, e_0 and e_p, then e_n forward + backward
  retain = retain_batch * (rollout + 1 + 3)  # x_r, r_p, then r_n forward + backward
  return attack + concept + retain


def unet_forward_flops(unet_cfg, unet_params, hw) -> float:
  unet = unet_lib.UNet2DConditionModel(unet_cfg)
  args = (jnp.zeros((1, hw, hw, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, unet_cfg.cross_attention_dim)))
  compiled = jax.jit(lambda p, *a: unet.apply({"params": p}, *a)).lower(unet_params, *args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="tiny", choices=setups.SIZES)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--attack_steps", type=int, default=30)
  p.add_argument("--retain_batch", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument(
    "--memory_only",
    action="store_true",
    help="compile both modes and print their memory; run nothing (UNet weights stay abstract)",
  )
  p.add_argument("--modes", default="online,bank", help="with --memory_only: which modes to compile")
  p.add_argument("--peak_tflops", type=float, default=None, help="dense peak for MFU (default: H200 on GPUs)")
  torch_unet.add_matmul_precision_flag(p)
  return p.parse_args()


def main():
  args = parse_args()
  clip_cfg, unet_cfg = setups.configs(args.size)
  hw = unet_cfg.sample_size
  print(
    f"backend={jax.default_backend()} size={args.size} latents {hw}x{hw} attack_steps={args.attack_steps} "
    f"retain_batch={args.retain_batch} dtype={args.dtype} remat={args.remat}",
    flush=True,
  )
  k1, k2 = jax.random.split(jax.random.key(0))
  clip_params = clip_text.init_params(clip_cfg, k1)
  init = jax.eval_shape if args.memory_only else lambda f, *a: jax.jit(f)(*a)  # eval_shape: no 3.4 GB on the host
  unet_params = init(
    unet_lib.UNet2DConditionModel(unet_cfg).init,
    k2,
    jnp.zeros((1, hw, hw, 4)),
    jnp.zeros((1,), jnp.int32),
    jnp.zeros((1, 77, unet_cfg.cross_attention_dim)),
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
  store = lambda f: frozen_lib.store_for_compute(f, models)  # as train.run stores it
  frozen = jax.eval_shape(store, frozen) if args.memory_only else store(frozen)
  step = jax.jit(step_lib.train_step, static_argnums=(0, 1, 5), donate_argnums=(2,))
  if args.memory_only:
    return print_memory(step, cfg, models, frozen, args, hw)
  fwd_flops = unet_forward_flops(unet_cfg, unet_params, hw)
  peak = args.peak_tflops or (setups.H200_PEAK_TFLOPS[args.dtype] if jax.default_backend() == "gpu" else None)

  def time_jax(bank):
    state = step_lib.init_state(cfg, models, frozen)
    idx = jnp.arange(args.retain_batch, dtype=jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(cfg, models, state, frozen, step_lib.Batch(idx, jax.random.key(0)), True, bank).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    compiled_gib = compiled_peak_gib(mem)
    state, m = compiled(state, frozen, step_lib.Batch(idx, jax.random.key(0)), bank)  # warm-up
    jax.block_until_ready(m)
    times = []
    for i in range(args.iters):
      t0 = time.perf_counter()
      state, m = compiled(state, frozen, step_lib.Batch(idx, jax.random.key(i + 1)), bank)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    per_it = float(np.mean(times))
    tflops = unet_forwards(bank is not None, args.attack_steps, args.retain_batch) * fwd_flops / per_it / 1e12
    stats = jax.devices()[0].memory_stats() or {}
    peak_gib = stats.get("peak_bytes_in_use", 0) / 2**30
    mfu = f"MFU {tflops / peak:.1%}" if peak else "MFU n/a (no peak for this backend)"
    detail = (
      f"compile {compile_s:.1f} s, compiled memory {compiled_gib:.2f} GiB"
      + (f", device peak {peak_gib:.2f} GiB" if peak_gib else "")
      + f", {tflops:.2f} TFLOP/s, {mfu}"
    )
    return per_it, detail

  results = {}
  per_it, detail = time_jax(None)
  results["jax online"] = per_it
  print(f"jax online : {per_it:8.3f} s/it ({detail})", flush=True)
  t0 = time.perf_counter()
  bank = build_bank(models, frozen, hw)
  jax.block_until_ready(bank)
  print(
    f"bank build : {time.perf_counter() - t0:8.3f} s (once per run: 8 concept + {len(retain_prompts)} retain rollouts)",
    flush=True,
  )
  per_it, detail = time_jax(bank)
  results["jax bank"] = per_it
  print(f"jax bank   : {per_it:8.3f} s/it ({detail})", flush=True)

  if not args.no_torch:
    results["pytorch"] = time_torch(args, clip_cfg, unet_cfg, clip_params, unet_params, frozen, k)
    print(f"pytorch    : {results['pytorch']:8.3f} s/it (reference transcription)", flush=True)
    for name in ("jax online", "jax bank"):
      print(f"speed-up {name} vs pytorch: {results['pytorch'] / results[name]:.2f}x")
  print(f"speed-up jax bank vs jax online: {results['jax online'] / results['jax bank']:.2f}x")


def build_bank(models, frozen, hw):
  return bank_lib.build(
    models.unet,
    frozen.unet,
    frozen,
    jax.random.key(1),
    concept_trajectories=8,
    retain_trajectories=1,
    latent_shape=(hw, hw, 4),
    guidance=3.0,
  )


def print_memory(step, cfg, models, frozen, args, hw):
  """Compiles the online and bank steps on abstract inputs and prints XLA's memory analysis of each."""
  state = jax.eval_shape(lambda f: step_lib.init_state(cfg, models, f), frozen)
  batch = step_lib.Batch(jnp.arange(args.retain_batch, dtype=jnp.int32), jax.random.key(0))
  bank = jax.eval_shape(lambda f: build_bank(models, f, hw), frozen)
  for name, b in (("online", None), ("bank", bank)):
    if name not in args.modes.split(","):
      continue
    t0 = time.perf_counter()
    mem = step.lower(cfg, models, state, frozen, batch, True, b).compile().memory_analysis()
    print(
      f"jax {name:<6}: compile {time.perf_counter() - t0:.1f} s; arguments {mem.argument_size_in_bytes / 2**30:.2f} "
      f"GiB, temporaries {mem.temp_size_in_bytes / 2**30:.2f}; peak {compiled_peak_gib(mem):.2f} GiB",
      flush=True,
    )


def compiled_peak_gib(mem) -> float:
  """Arguments + outputs + temporaries, counting once the outputs that reuse donated argument buffers."""
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return total / 2**30


def time_torch(args, clip_cfg, unet_cfg, clip_params, unet_params, frozen, k):
  import torch
  import transformers

  from advunlearn_jax.convert import clip_text as clip_convert
  from tests import reference_torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.set_float32_matmul_precision(args.torch_matmul_precision)
  unet = torch_unet.diffusers_unet(unet_cfg, unet_params, device)
  hf = transformers.CLIPTextConfig(**clip_cfg.to_transformers_dict())
  clips = []
  for _ in range(2):
    model = transformers.CLIPTextModel(hf).eval()
    model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in clip_convert.state_dict(clip_params, "").items()}, strict=False
    )
    clips.append(model.to(device))
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
  if device == "cuda":
    print(
      f"pytorch peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, fp32 matmul precision "
      f"{args.torch_matmul_precision}",
      flush=True,
    )
  return float(np.mean(times[1:]))


if __name__ == "__main__":
  main()

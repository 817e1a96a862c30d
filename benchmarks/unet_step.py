"""UNet forward + backward at Stable Diffusion v1.4 size (random weights): time, memory, MFU.

The backward pass is taken with respect to the conditioning, as in AdvUnlearn's text-encoder methods
(gradients flow through the frozen UNet into CLIP); `--wrt=params` differentiates the UNet weights instead
(the ESD-style UNet methods). Every configuration is compiled once (`.lower().compile()`, compile time
reported), then timed over `--iters` runs; ratios are against the first configuration, measured in the
same run.

  python benchmarks/unet_step.py                                   # the full grid (GPU)
  python benchmarks/unet_step.py --batch=1 --dtype=float32 --remat=none,full --iters=2   # a CPU-sized subset
  python benchmarks/unet_step.py --batch=1 --dtype=float32 --remat=none --iters=2 --torch  # vs diffusers
  python benchmarks/unet_step.py --size=tiny --batch=1 --dtype=float32 --remat=none --torch  # the script, in seconds

`--torch` adds diffusers' UNet with the same weights as the baseline for each batch and dtype (bfloat16 under
autocast, i.e. fp32 weights and bf16 compute, as the JAX side; float32 with TF32 matmuls on GPUs, as JAX's
default precision does, unless `--torch_matmul_precision=highest`) and prints the JAX/diffusers speed-up of
every JAX row.

Peak memory: XLA's compiled memory analysis (arguments + outputs + temporaries) on every backend, and the
allocator's peak on GPUs. MFU: the step's matmul and convolution FLOPs counted from its jaxpr (benchmarks/flops.py;
with remat, the recomputed forward included), over time, against the chip's dense peak for the dtype
(`--peak_tflops`, default H200: 989 bf16, 494 fp32-as-TF32). Not XLA's cost analysis: on GPUs it leaves out what
runs in cuBLAS and cuDNN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from advunlearn_jax.models import unet as unet_lib  # noqa: E402
from advunlearn_jax.testing import tiny_models  # noqa: E402
from benchmarks import flops as flop_count  # noqa: E402
from benchmarks import setups, torch_unet  # noqa: E402


def parse_args():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", default="1,6")
  p.add_argument("--dtype", default="float32,bfloat16")
  p.add_argument("--remat", default="none,full,dots")
  p.add_argument("--wrt", default="context", choices=["context", "params"])
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--size", default="sd14", choices=tiny_models.SIZES, help="tiny: a CPU-sized check of the script")
  p.add_argument("--latent", type=int, default=0, help="latent height and width (default: the UNet's sample size)")
  p.add_argument("--peak_tflops", type=float, default=None, help="override the dense peak used for MFU")
  p.add_argument("--json_out", default=None)
  p.add_argument("--torch", action="store_true", help="add the diffusers baseline (needs torch + diffusers)")
  torch_unet.add_matmul_precision_flag(p)
  return p.parse_args()


def measure(config, params, batch, dtype, remat, wrt, iters, latent):
  unet = unet_lib.UNet2DConditionModel(config, dtype=jnp.dtype(dtype), remat_policy=remat)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, latent, latent, 4)), jnp.float32)
  ctx = jnp.asarray(rng.normal(size=(batch, 77, config.cross_attention_dim)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, batch), jnp.int32)

  def loss(params, ctx):
    return jnp.mean(unet.apply({"params": params}, x, t, ctx) ** 2)

  argnum = 1 if wrt == "context" else 0
  step = jax.jit(jax.value_and_grad(loss, argnums=argnum))
  t0 = time.perf_counter()
  compiled = step.lower(params, ctx).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  compiled_bytes = None
  if mem is not None:
    compiled_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  flops = flop_count.count(jax.value_and_grad(loss, argnums=argnum), params, ctx)
  loss = float(jax.block_until_ready(compiled(params, ctx))[0])  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, ctx))
    times.append(time.perf_counter() - t0)
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "batch": batch,
    "dtype": dtype,
    "remat": remat,
    "wrt": wrt,
    "compile_s": compile_s,
    "step_s": float(np.median(times)),
    "flops": flops,
    "compiled_gib": compiled_bytes / 2**30 if compiled_bytes else None,
    "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
    "loss": loss,
  }


def measure_torch(config, params, batch, dtype, wrt, iters, latent, matmul_precision):
  """diffusers' UNet, same weights and inputs, same loss and gradient; the median of `iters` after a warm-up."""
  import torch

  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.set_float32_matmul_precision(matmul_precision)
  unet = torch_unet.diffusers_unet(config, params, device)
  unet.requires_grad_(wrt == "params")
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(batch, latent, latent, 4)).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
  ctx = torch.from_numpy(rng.normal(size=(batch, 77, config.cross_attention_dim)).astype(np.float32))
  t = torch.from_numpy(rng.integers(0, 1000, batch))
  x, ctx, t = x.to(device), ctx.to(device).requires_grad_(wrt == "context"), t.to(device)

  def step():
    with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = unet(x, t, ctx).sample.float().pow(2).mean()
    loss.backward()
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss.detach())

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  loss = step()  # warm-up
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
  return {"batch": batch, "dtype": dtype, "step_s": float(np.median(times)), "peak_gib": peak, "loss": loss}


def main():
  args = parse_args()
  _, config = tiny_models.configs(args.size)
  latent = args.latent or config.sample_size
  device = jax.devices()[0]
  print(f"backend={jax.default_backend()} device={device.device_kind} jax={jax.__version__}", flush=True)
  params = jax.jit(unet_lib.UNet2DConditionModel(config).init)(
    jax.random.key(0),
    jnp.zeros((1, latent, latent, 4)),
    jnp.zeros((1,), jnp.int32),
    jnp.zeros((1, 77, config.cross_attention_dim)),
  )["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"{args.size} UNet: {n_params:,} parameters, latents {latent}x{latent}", flush=True)
  results = []
  grid = itertools.product([int(b) for b in args.batch.split(",")], args.dtype.split(","), args.remat.split(","))
  header = f"{'batch':>5} {'dtype':>8} {'remat':>5} {'compile s':>9} {'step s':>8} {'ratio':>6} {'TFLOP/s':>8} "
  header += f"{'MFU':>6} {'compiled GiB':>12} {'peak GiB':>8}"
  print(header, flush=True)
  baselines = {}
  for batch, dtype, remat in grid:
    r = measure(config, params, batch, dtype, remat, args.wrt, args.iters, latent)
    if args.torch and (batch, dtype) not in baselines:
      baselines[batch, dtype] = measure_torch(
        config, params, batch, dtype, args.wrt, args.iters, latent, args.torch_matmul_precision
      )
      b = baselines[batch, dtype]
      pg = f", peak {b['peak_gib']:.2f} GiB" if b["peak_gib"] else ""
      # Same weights and inputs: the losses agree (to bf16 rounding in bf16), or the baseline is not a baseline.
      print(f"  diffusers batch {batch} {dtype}: {b['step_s']:.3f} s{pg}, loss {b['loss']:.6f} (JAX {r['loss']:.6f})")
    if args.torch:
      r["speedup_vs_diffusers"] = baselines[batch, dtype]["step_s"] / r["step_s"]
    base = results[0] if results else r
    r["ratio_vs_first"] = base["step_s"] / r["step_s"] * (r["batch"] / base["batch"])  # throughput ratio
    r["tflops"] = r["flops"] / r["step_s"] / 1e12
    peak = args.peak_tflops or (setups.H200_PEAK_TFLOPS[dtype] if jax.default_backend() == "gpu" else None)
    r["mfu"] = r["tflops"] / peak if peak else None
    results.append(r)
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
    cg = f"{r['compiled_gib']:.2f}" if r["compiled_gib"] else "-"
    pg = f"{r['peak_gib']:.2f}" if r["peak_gib"] else "-"
    print(
      f"{batch:>5} {dtype:>8} {remat:>5} {r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['ratio_vs_first']:>6.2f} "
      f"{r['tflops']:>8.2f} {mfu:>6} {cg:>12} {pg:>8}"
      + (f" {r['speedup_vs_diffusers']:>6.2f}x vs diffusers" if args.torch else ""),
      flush=True,
    )
    if args.json_out:  # after every row, so a run cut short keeps what it measured
      with open(args.json_out, "w") as f:
        json.dump(
          {
            "device": device.device_kind,
            "backend": jax.default_backend(),
            "results": results,
            "diffusers": list(baselines.values()),
          },
          f,
          indent=2,
        )
  print("ratio = samples/s relative to the first row (higher is faster)")


if __name__ == "__main__":
  main()

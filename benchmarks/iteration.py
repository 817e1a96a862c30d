"""Seconds per AdvUnlearn outer iteration (after warm-up: attack + defender step), in one run on the same weights:
the plain PyTorch transcription of the reference, and JAX with x_t rolled out one partial DDIM after another
(online_sequential), all in one batched pass (online), from a fixed trajectory bank (bank) and from a renewing
one (bank_renewing). Prints ratios against the transcription and against online_sequential.

  python benchmarks/iteration.py --size=tiny            # CPU-sized random models, 16x16 latents (the default)
  python benchmarks/iteration.py --size=small           # 8x8 latents, 32 channels
  python benchmarks/iteration.py --size=sd14 --iters=3  # SD v1.4 UNet + CLIP-L with random weights (GPU)
  python benchmarks/iteration.py --size=sd14 --memory_only --dtype=bfloat16   # compile only: memory, any machine
  python benchmarks/iteration.py --size=sd14 --memory_only --dtype=bfloat16 --target=h200  # XLA:GPU's, no GPU
  python benchmarks/iteration.py --size=sd14 --memory_only --dtype=bfloat16 --target=v5e-8  # libtpu's, no TPU
  python benchmarks/iteration.py --size=sd21 --memory_only --dtype=bfloat16 --target=v4-32 --method=noxattn
  python benchmarks/iteration.py --size=sdxl --memory_only --dtype=bfloat16 --remat=dots --target=h200  # SDXL base
  python benchmarks/iteration.py --size=sd14 --flops_only --modes=online --method=noxattn --warmup  # an ESD iteration

With --target, the step is compiled as the trainer would run it on that machine: its mesh (sharding.fsdp_size's
rule over the target's devices: data parallel for text-encoder methods, FSDP within a host for UNet methods),
its parameter and state shardings, per chip; each mode prints its memory per chip against the chip's HBM and the
collectives the compiled step holds. TPU targets need libtpu, in a venv of its own (it is no requirement):
pip install "jax[tpu]==<the jax version>"; libtpu's complaint about TPU worker hostnames does not stop it.
`--exec_effort=-1` asks the compiler for the least optimisation of execution time (JAX's
`exec_time_optimization_effort`, -1 to 1, default 0): libtpu then spends about a fifth of the time generating
code for an SD-size step, which is what makes these compiles finish on a small host (docs/scaling.md).

Per mode: seconds per iteration (median), sequential UNet calls per iteration (one CFG DDIM step, one frozen
forward, one forward or backward pass of a loss: each a UNet call that waits for the one before), FLOP
efficiency (the UNet rows a per-point rollout needs over the rows computed: the batched rollout's idle slots, or
its buckets' rows that are done, are masked work), and XLA's compiled memory (arguments + outputs + temporaries).
The rollouts' counts are measured in the step (its `rollout_*` metrics); the rest follow from the iteration's
shape (spec 2.3-2.4).
`--json=FILE` writes {mode: {"s_per_iter", "sequential_unet_calls", "flop_efficiency"}} (with --memory_only:
{mode: {"compile_s", "peak_gib", "collectives", ...}}); `--merge A.json B.json` joins timing files from separate
runs (the GPU check times each mode in its own process) and prints the ratios.

`--no_torch` skips the PyTorch baseline (it needs torch + diffusers + transformers). On GPUs its fp32 matmuls
run in TF32, the arithmetic of JAX's default precision there, so the ratio compares like with like
(`--torch_matmul_precision=highest`: PyTorch's own default, as the reference runs). Bank build time is reported
separately: it is paid once per run, not per iteration. TFLOP/s and MFU count the step's own matmuls and
convolutions from its jaxpr (benchmarks/flops.py: both towers, every backward pass as differentiation writes it),
the rollout's loop at the UNet calls the step measured and the bank's renewal once per period; not XLA's cost
analysis of the compiled program, which on GPUs leaves out what runs in cuBLAS and cuDNN (docs/scaling.md); peak:
`--peak_tflops`, default the H200's dense 989 (bf16) and 494 (fp32 as TF32) on GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from advunlearn_jax import compile_cache, config_lib, sharding  # noqa: E402
from advunlearn_jax.data import tokenizer as tok_lib  # noqa: E402
from advunlearn_jax.diffusion import ddim, sdxl_conditioning  # noqa: E402
from advunlearn_jax.models import clip_text, presets  # noqa: E402
from advunlearn_jax.models import unet as unet_lib  # noqa: E402
from advunlearn_jax.models.pipeline_record import ScheduleConfig, SDXLPipeline  # noqa: E402
from advunlearn_jax.testing import tiny_models  # noqa: E402
from advunlearn_jax.unlearn import bank as bank_lib  # noqa: E402
from advunlearn_jax.unlearn import retain, wiring  # noqa: E402
from advunlearn_jax.unlearn import step as step_lib  # noqa: E402
from benchmarks import flops, setups, torch_unet  # noqa: E402

JAX_MODES = ("online_sequential", "online", "bank", "bank_renewing")
SDXL_SIZES = ("sdxl", "micro_sdxl")  # SDXL base's layout; the tests' micro one
MODES = ("pytorch", *JAX_MODES)
DDIM_STEPS = 50
BANK_TRAJECTORIES = 8


@dataclasses.dataclass
class Cost:
  """One iteration's UNet work: calls in sequence, rows computed and rows needed (batch-1 forward = 1 row; CFG
  steps count both halves; a backward pass counts as two forwards), for the calls and the FLOP efficiency (a
  ratio); the FLOPs themselves are counted from the step (`step_flops`)."""

  calls: float
  computed: float
  useful: float


def loss_cost(attack_steps: int, concept_batch: int, retain_batch: int, renewals: float = 0, renewed: int = 0) -> Cost:
  """Everything but the partial-DDIM rollouts, as the JAX step runs it: one frozen call for every target (the
  attack's e_p, e_0 and e_p, the retain targets); per attack step a forward and a backward at batch 1; the
  defender's concept and retain forwards and their backwards; `renewals` per iteration of the bank, each
  `renewed` full 49-step CFG rollouts at once."""
  targets = attack_steps + 2 * concept_batch + retain_batch
  rows = targets + 3 * attack_steps + 3 * (concept_batch + retain_batch) + renewals * 2 * (DDIM_STEPS - 1) * renewed
  calls = 1 + 2 * attack_steps + 4 + renewals * (DDIM_STEPS - 1)
  return Cost(calls, rows, rows)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", default="tiny", choices=(*tiny_models.SIZES, *SDXL_SIZES))
  p.add_argument("--iters", type=int, default=3, help="timed iterations per mode (after one warm-up)")
  p.add_argument("--attack_steps", type=int, default=30)
  p.add_argument("--retain_batch", type=int, default=5)
  p.add_argument("--dtype", default="float32")
  p.add_argument(
    "--method", default="", help="train.method: the tower and layers trained (default text_encoder_full; SDXL: both)"
  )
  p.add_argument("--remat", default="none")
  p.add_argument("--rollout_buckets", type=int, default=0, help="with --rows_per_call=0; 0: wiring.ROLLOUT_BUCKETS")
  p.add_argument(
    "--rows_per_call", type=int, default=-1, help="online's slots; 0: buckets; -1: wiring.rollout_rows_per_call's"
  )
  p.add_argument("--refresh_every", type=int, default=None, help="bank_renewing; default: the config's")
  p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
  p.add_argument("--no_torch", action="store_true", help="leave out the pytorch mode")
  p.add_argument("--json", default="", help="write {mode: {s_per_iter, sequential_unet_calls, flop_efficiency}}")
  p.add_argument("--merge", nargs="+", default=[], help="--json files of earlier runs: join them, print the ratios")
  p.add_argument(
    "--memory_only",
    action="store_true",
    help="compile the JAX modes and print their memory; run nothing (UNet weights stay abstract)",
  )
  p.add_argument(
    "--flops_only",
    action="store_true",
    help="count one iteration's FLOPs from the step's jaxpr, its online rollout at the rows it needs on average; "
    "compile and run nothing (UNet weights stay abstract)",
  )
  p.add_argument(
    "--warmup",
    action="store_true",
    help="the warm-up step instead of the attacking one: ESD + retain, no attack (an ESD run's every iteration, "
    "e.g. a two-stage recipe's first stage)",
  )
  p.add_argument(
    "--target",
    default="",
    choices=("", *setups.TARGETS),
    help="with --memory_only: compile for this accelerator on this host, as the trainer would lay the step out "
    "there (an H200 with XLA:GPU: JAX's CUDA plugin; a TPU slice with libtpu)",
  )
  p.add_argument(
    "--exec_effort",
    type=float,
    default=0.0,
    help="with --memory_only: JAX's exec_time_optimization_effort for the compile, -1 (compile fastest) to 1",
  )
  p.add_argument("--peak_tflops", type=float, default=None, help="dense peak for MFU (default: H200 on GPUs)")
  p.add_argument(
    "--compilation_cache",
    default="",
    help="persistent compilation cache folder (on GPUs it also keeps XLA's autotuning results per fusion); "
    "default: none, every compilation cold",
  )
  torch_unet.add_matmul_precision_flag(p)
  args = p.parse_args(argv)
  sdxl = args.size in SDXL_SIZES
  args.method = args.method or ("text_encoders_full" if sdxl else "text_encoder_full")
  # The PyTorch transcription is the reference's, SD v1.x's: SDXL has none to compare against.
  no_torch = args.no_torch or sdxl
  args.modes = [m for m in args.modes.split(",") if m and not (m == "pytorch" and no_torch)]
  unknown = set(args.modes) - set(MODES)
  if unknown:
    p.error(f"unknown modes {sorted(unknown)}; valid: {list(MODES)}")
  if args.warmup and "pytorch" in args.modes:
    p.error("--warmup: the PyTorch transcription times attacking iterations; add --no_torch")
  if args.flops_only and args.memory_only:
    p.error("--flops_only and --memory_only: one at a time")
  if args.target and not args.memory_only:
    p.error("--target compiles without running: it needs --memory_only")
  if args.exec_effort and not args.memory_only:
    p.error("--exec_effort changes what is compiled, not timed: it needs --memory_only")
  if not -1.0 <= args.exec_effort <= 1.0:
    p.error(f"--exec_effort={args.exec_effort}: expected a number from -1 to 1")
  return args


class Harness:
  """The models, frozen inputs and a StepConfig per mode, as train.run builds them; on `devices` (another
  machine's, for an ahead-of-time compile) with the mesh train.run would build of them."""

  def __init__(self, args, devices: list | None = None):
    self.args = args
    self.sdxl = sdxl_pipeline(args.size) if args.size in SDXL_SIZES else None
    if self.sdxl is not None:
      self.clip_cfg, self.unet_cfg = self.sdxl.text_config, self.sdxl.unet_config
    else:
      self.clip_cfg, self.unet_cfg = tiny_models.configs(args.size)
    self.hw = self.unet_cfg.sample_size
    k1, k2 = jax.random.split(jax.random.key(0))
    if self.sdxl is not None:
      self.clip_params = self.sdxl.text_tree
    else:
      self.clip_params = clip_text.init_params(self.clip_cfg, k1)
    self.abstract = args.memory_only or args.flops_only
    init = jax.eval_shape if self.abstract else lambda f, *a: jax.jit(f)(*a)  # no 3.4 GB on the host
    x, t, cond = unet_row_inputs(self)
    flat = (cond.context, cond.added) if isinstance(cond, unet_lib.SDXLCond) else (cond,)
    unet = unet_lib.UNet2DConditionModel(self.unet_cfg)
    self.unet_params = init(lambda key: unet.init(key, x, t, *flat)["params"], k2)
    self.retain_prompts = retain.load_dataset("coco_object")[:16]
    config = config_lib.base_config()
    config.concept.prompts = ("nudity",)
    config.retain.dataset, config.retain.prompts = "", tuple(self.retain_prompts)
    config.retain.batch, config.retain.weight = args.retain_batch, 0.3
    config.attack.steps = args.attack_steps
    config.model.dtype, config.model.remat = args.dtype, args.remat
    config.train.method = args.method
    slots = args.rows_per_call
    if slots < 0 and devices:  # the target's default, not the compiling host's
      slots = wiring.rollout_rows_per_call(self.hw, backend=devices[0].platform)
    config.train.rollout_buckets, config.train.rollout_rows_per_call = args.rollout_buckets, slots
    sections = wiring.TrainingSections.from_config(config)
    if self.sdxl is not None:
      tokenizer_2 = tok_lib.load_tokenizer(self.sdxl.tokenizer_2_dir)
      tokenizers = {"tokenizer": tok_lib.load_tokenizer(), "tokenizer_2": tokenizer_2}
      wire = lambda unet_params: wiring.wire_sdxl(
        config, sections, self.sdxl._replace(unet_params=unet_params), retain_prompts=self.retain_prompts, **tokenizers
      )
    else:
      wire = lambda unet_params: wiring.wire(
        config,
        sections,
        clip_config=self.clip_cfg,
        clip_params=self.clip_params,
        unet_config=self.unet_cfg,
        unet_params=unet_params,
        schedule=ScheduleConfig(),
        tokenizer=tok_lib.load_tokenizer(),
        retain_prompts=self.retain_prompts,
      )
    if self.abstract:  # wired around abstract UNet weights: shapes only, no 3.4 GB on the host
      wired = {}
      self.frozen = jax.eval_shape(lambda u: wired.setdefault("w", wire(u)).frozen, self.unet_params)
      base, self.models = wired["w"].cfg, wired["w"].models
    else:
      base, self.models, self.frozen, _ = wire(self.unet_params)
    self.mesh = None
    if devices:
      self.mesh = sharding.make_mesh(devices, sharding.fsdp_size(config.mesh.fsdp, self.models.trained.tower, devices))
      self.models = self.models._replace(mesh=self.mesh)
    self.k = base.num_tokens
    run_bank = bank_lib.BankConfig.from_config(config.bank)
    # The run defaults' renewal, over this benchmark's bank size; `bank` is the same bank never renewed.
    self.renewal = dataclasses.replace(
      run_bank, concept_trajectories=BANK_TRAJECTORIES, refresh_every=args.refresh_every or run_bank.refresh_every
    )
    fixed = dataclasses.replace(self.renewal, refresh_trajectories=0, refresh_retain=0, refresh_every=1)
    self.base = dataclasses.replace(base, bank=fixed)

  def step_config(self, mode: str) -> step_lib.StepConfig:
    if mode.startswith("bank"):
      bank = self.renewal if mode == "bank_renewing" else self.base.bank
      return dataclasses.replace(self.base, xt_source="bank", bank=bank)
    return dataclasses.replace(self.base, xt_source=mode)

  def bank(self, cfg: step_lib.StepConfig, frozen=None):
    return bank_lib.build(
      self.models.unet,
      (frozen or self.frozen).unet,
      frozen or self.frozen,
      jax.random.key(1),
      cfg.bank,
      latent_shape=(self.hw, self.hw, 4),
      guidance=cfg.start_guidance,
    )

  def renewal_cost(self, cfg: step_lib.StepConfig) -> tuple[float, int]:
    """(renewals per iteration, trajectories per renewal)."""
    b = cfg.bank
    if cfg.xt_source != "bank" or not (b.refresh_trajectories or b.refresh_retain):
      return 0.0, 0
    return 1 / b.refresh_every, b.refresh_trajectories * self.frozen.concept_emb.shape[0] + b.refresh_retain


STEP = wiring.train_step


def time_jax(s: Harness, mode: str, peak: float | None) -> dict:
  args, cfg = s.args, s.step_config(mode)
  bank = None
  if cfg.xt_source == "bank":
    t0 = time.perf_counter()
    bank = jax.block_until_ready(s.bank(cfg))
    print(f"{'bank build':<18}: {time.perf_counter() - t0:8.3f} s (once per run)", flush=True)
  state = step_lib.init_state(cfg, s.models, s.frozen, bank)
  batch = lambda i: step_lib.Batch(jnp.arange(args.retain_batch, dtype=jnp.int32), jax.random.key(i))
  print(f"{mode:<18}: compiling ({time.strftime('%H:%M:%S')})", flush=True)  # a timeout shows where it stopped
  t0 = time.perf_counter()
  compiled = STEP.lower(cfg, s.models, state, s.frozen, batch(0), not args.warmup).compile()
  compile_s = time.perf_counter() - t0
  memory = compiled_gib(compiled.memory_analysis())
  state, m = compiled(state, s.frozen, batch(0))  # warm-up
  jax.block_until_ready(m)
  # A renewing bank's cost arrives every refresh_every iterations: time whole periods.
  every = cfg.bank.refresh_every if mode == "bank_renewing" else 1
  n = -(-args.iters // every) * every
  times, rollouts = [], []
  for i in range(n):
    t0 = time.perf_counter()
    state, m = compiled(state, s.frozen, batch(i + 1))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
    rollouts.append([float(m[k]) for k in ("rollout_calls", "rollout_computed_rows", "rollout_useful_rows")])
  per_it = float(np.median(times)) if every == 1 else float(np.mean(times))
  calls, computed, useful = np.mean(rollouts, axis=0)
  rest = loss_cost(attack_steps(args), cfg.concept_batch, args.retain_batch, *s.renewal_cost(cfg))
  cost = Cost(calls + rest.calls, 2 * computed + rest.computed, 2 * useful + rest.useful)  # CFG: two rows a step
  tflops = step_flops(s, cfg, state, batch(0), 2 * computed) / per_it / 1e12  # CFG: two rows
  stats = jax.devices()[0].memory_stats() or {}
  peak_gib = stats.get("peak_bytes_in_use", 0) / 2**30
  mfu = f"MFU {tflops / peak:.1%}" if peak else "MFU n/a (no peak for this backend)"
  print(
    f"{mode:<18}: {per_it:8.3f} s/it, {cost.calls:6.1f} sequential UNet calls, FLOP efficiency "
    f"{cost.useful / cost.computed:.1%} (compile {compile_s:.1f} s, compiled memory {memory:.2f} GiB"
    + (f", device peak {peak_gib:.2f} GiB" if peak_gib else "")
    + f", {tflops:.2f} TFLOP/s, {mfu})",
    flush=True,
  )
  return {"s_per_iter": per_it, "sequential_unet_calls": cost.calls, "flop_efficiency": cost.useful / cost.computed}


def attack_steps(args) -> int:
  """The attack steps the timed step takes: none in a warm-up step."""
  return 0 if args.warmup else args.attack_steps


def abstract_batch(s: Harness):
  return jax.eval_shape(lambda: step_lib.Batch(jnp.arange(s.args.retain_batch, dtype=jnp.int32), jax.random.key(0)))


def abstract_states(s: Harness):
  """(mode, its StepConfig, its training state's shapes) for each JAX mode of --modes: nothing allocated."""
  for mode in s.args.modes:
    if mode == "pytorch":
      continue
    cfg = s.step_config(mode)
    bank = jax.eval_shape(lambda f, cfg=cfg: s.bank(cfg, f), s.frozen) if cfg.xt_source == "bank" else None
    yield mode, cfg, jax.eval_shape(lambda f, b, cfg=cfg: step_lib.init_state(cfg, s.models, f, b), s.frozen, bank)


def print_flops(s: Harness, points: int) -> dict:
  """One iteration's FLOPs per JAX mode, counted from the step's jaxpr on abstract weights: the online rollout
  at the rows its `points` need on average (t_enc uniform over the DDIM grid, timesteps.draw_timesteps: 25.5
  CFG steps of two rows each per point), the useful rows alone (the target's batching adds its idle slots)."""
  batch = abstract_batch(s)
  row = unet_row_flops(s)
  walk = float(np.mean(ddim.num_unet_steps(np.arange(DDIM_STEPS), DDIM_STEPS)))  # UNet steps a point walks
  results = {}
  for mode, cfg, state in abstract_states(s):
    rollout_rows = 2 * walk * points if cfg.xt_source.startswith("online") else 0  # CFG: two rows a step
    total = step_flops(s, cfg, state, batch, rollout_rows)
    step = "warm-up (no attack)" if s.args.warmup else "attacking"
    print(
      f"{mode:<18}: {total / 1e12:8.2f} TFLOP per {step} iteration ({s.args.method}), {rollout_rows:.0f} rollout rows "
      f"of {row / 1e9:.0f} GFLOP: {rollout_rows * row / total:.0%} of it",
      flush=True,
    )
    results[mode] = {"tflop_per_iter": total / 1e12, "rollout_rows": rollout_rows, "unet_row_gflop": row / 1e9}
  if s.args.json:
    with open(s.args.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


def step_flops(s: Harness, cfg: step_lib.StepConfig, state, batch, rollout_rows: float) -> float:
  """One iteration's FLOPs, counted from the step's jaxpr (benchmarks/flops.py): what runs every iteration; the
  rollout's loops as the UNet rows they computed (`rollout_rows`, counted in the step), each one UNet forward; and
  the bank's renewal (the step's one cond) once every `refresh_every` iterations."""
  parts = flops.jaxpr_parts(STEP.trace(cfg, s.models, state, s.frozen, batch, not s.args.warmup).jaxpr.jaxpr)
  if len(parts.branches) > (cfg.xt_source == "bank"):
    raise ValueError(f"the step holds {len(parts.branches)} conds with matmuls; only the bank's renewal was expected")
  renewal = max(parts.branches[0]) / cfg.bank.refresh_every if parts.branches else 0.0
  return parts.fixed + rollout_rows * unet_row_flops(s) + renewal


def unet_row_inputs(s: Harness) -> tuple:
  """(latents, timesteps, conditioning) of one UNet row, zeros: SD's context array, or SDXL's SDXLCond."""
  cond = jnp.zeros((1, 77, s.unet_cfg.cross_attention_dim))
  if s.sdxl is not None:
    ids = sdxl_conditioning.time_ids(s.sdxl, 1)
    cond = unet_lib.SDXLCond(cond, unet_lib.AddedCond(jnp.zeros((1, s.sdxl.text_config_2.projection_dim)), ids))
  return jnp.zeros((1, s.hw, s.hw, s.unet_cfg.in_channels)), jnp.zeros((1,), jnp.int32), cond


def unet_row_flops(s: Harness) -> float:
  """One UNet forward at batch 1, from its jaxpr."""
  unet = unet_lib.UNet2DConditionModel(s.unet_cfg)
  args = jax.eval_shape(lambda: unet_row_inputs(s))
  return flops.count(lambda p, *a: unet_lib.apply_conditioned(unet, p, *a), s.unet_params, *args)


def sdxl_pipeline(size: str) -> SDXLPipeline:
  """SDXL base's layout (models/presets.py; `micro_sdxl`: the tests' micro SDXL layout) with random text towers
  drawn on the host (the step encodes the concept and retain prompts with them: real arrays, 3.3 GB in fp32 for
  SDXL base) and no UNet weights (the harness' own, abstract with --memory_only), no VAE: the micro-conditioning's
  1024 px are the UNet's 128 latents times diffusers' default 8. tokenizer_2 pads with "!", as SDXL base's does."""
  import tempfile

  if size == "sdxl":
    text, text_2 = clip_text.CLIPTextConfig(**presets.SDXL_TEXT), clip_text.CLIPTextConfig(**presets.SDXL_TEXT_2)
    unet = unet_lib.UNetConfig.from_dict(presets.SDXL_UNET, source="presets.SDXL_UNET")
  else:
    text, text_2, unet, _ = tiny_models.micro_sdxl()
  params = clip_text.abstract_params(text), clip_text.abstract_params(text_2, with_projection=True)
  params = [tiny_models.random_params(a, seed) for seed, a in enumerate(params)]
  tokenizer_2 = tok_lib.write_clip_tokenizer_folder(os.path.join(tempfile.mkdtemp(), "tokenizer_2"), pad_token="!")
  return SDXLPipeline(
    "", unet, None, None, None, text, params[0], text_2, params[1], "", tokenizer_2, tiny_models.SDXL_SCHEDULE
  )


def main(argv=None):
  args = parse_args(argv)
  if args.merge:
    try:
      return report(merge(args.merge), args.json)
    except ValueError as e:
      print(e, file=sys.stderr)
      sys.exit(2)
  devices = None
  if args.target:  # compiled, never run: the host's own devices stay out of it (and a GPU-less host has no driver)
    jax.config.update("jax_platforms", "cpu")
    try:
      devices = setups.target_devices(args.target)
    except ValueError as e:
      print(e, file=sys.stderr)
      sys.exit(2)
  if args.compilation_cache:  # before the first compilation: JAX decides once per process
    print(f"compilation cache: {compile_cache.enable(args.compilation_cache)} (what it holds loads, not compiles)")
  start = time.perf_counter()
  s = Harness(args, devices)
  print(
    f"backend={jax.default_backend()} size={args.size} latents {s.hw}x{s.hw} attack_steps={args.attack_steps} "
    f"retain_batch={args.retain_batch} dtype={args.dtype} remat={args.remat} "
    f"(weights and wiring: {time.perf_counter() - start:.1f} s)",
    flush=True,
  )
  rows = attack_steps(args) + 1 + args.retain_batch
  batching = (
    f"{s.base.rollout_rows_per_call} slots (points walking per UNet call)"
    if s.base.rollout_rows_per_call
    else f"bucket widths {ddim.bucket_widths(rows, s.base.rollout_buckets)}"
  )
  print(
    f"online: {rows} points, {batching}; bank: {BANK_TRAJECTORIES} trajectories per concept; bank_renewing: "
    f"{s.renewal.refresh_trajectories} per concept and {s.renewal.refresh_retain} retain prompt every "
    f"{s.renewal.refresh_every} iterations",
    flush=True,
  )
  if args.flops_only:
    return print_flops(s, rows)
  if args.memory_only:
    memory = print_memory(s)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(
          {"target": args.target, "size": args.size, "method": args.method, "dtype": args.dtype, **memory}, f, indent=1
        )
    return memory
  peak = args.peak_tflops or (setups.H200_PEAK_TFLOPS[args.dtype] if jax.default_backend() == "gpu" else None)
  results = {}
  for mode in args.modes:
    if mode == "pytorch":
      results[mode] = time_torch(s)
    else:
      results[mode] = time_jax(s, mode, peak)
  return report(results, args.json)


def merge(paths: list[str]) -> dict:
  """The modes of several `--json` files in one dict. ValueError names the file that is not one, or that repeats
  a mode."""
  results = {}
  for path in paths:
    try:
      with open(path) as f:
        part = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"--merge {path}: cannot read it as JSON ({e})") from None
    rows_ok = isinstance(part, dict) and all(isinstance(r, dict) and "s_per_iter" in r for r in part.values())
    if not rows_ok or set(part) - set(MODES) or set(part) & set(results):
      raise ValueError(
        f"--merge {path}: expected {{mode: {{s_per_iter, ...}}}} with modes of {list(MODES)} not already merged"
      )
    results.update(part)
  return results


def report(results: dict, json_path: str) -> dict:
  """Speed-ups against the transcription and online_sequential; writes `json_path` if given."""
  for base in ("pytorch", "online_sequential"):
    for mode in results:
      if base in results and mode != base and mode != "pytorch":
        print(f"speed-up {mode} vs {base}: {results[base]['s_per_iter'] / results[mode]['s_per_iter']:.2f}x")
  if "bank" in results and "bank_renewing" in results:
    print(f"bank_renewing / bank time: {results['bank_renewing']['s_per_iter'] / results['bank']['s_per_iter']:.2f}x")
  if json_path:
    with open(json_path, "w") as f:
      json.dump(results, f, indent=1)
  return results


def print_memory(s: Harness):
  """Compiles each JAX mode's step on abstract inputs and prints XLA's memory analysis of it, per device: laid
  out on the harness' mesh as train.run lays it out (wiring.lay_out_frozen, wiring.lay_out_state) when it has
  one, else on the default backend's device."""
  batch = abstract_batch(s)
  mesh, target = s.mesh, s.args.target
  results = {}
  if mesh is not None:
    kind = mesh.devices.flat[0].device_kind
    hosts = len({d.process_index for d in mesh.devices.flat})
    where = f"{kind}, {mesh.size} devices on {hosts} host(s)"
    print(f"compiling for {target} ({where}), mesh {dict(mesh.shape)}, no device needed", flush=True)
  for mode, cfg, state in abstract_states(s):
    frozen = s.frozen
    if mesh is not None:  # train.run's layout; the loop replicates the batch
      frozen = wiring.lay_out_frozen(frozen, mesh, abstract=True)
      state = wiring.lay_out_state(state, mesh, abstract=True)
      batch = sharding.abstract(batch, mesh, sharded=False)
    t0 = time.perf_counter()
    lowered = STEP.lower(cfg, s.models, state, frozen, batch, not s.args.warmup)
    options = dict(setups.DEVICELESS_COMPILER_OPTIONS) if target in setups.GPU_TARGETS else {}
    if s.args.exec_effort:
      options["exec_time_optimization_effort"] = s.args.exec_effort
    compiled = lowered.compile(compiler_options=options or None)
    seconds, mem = time.perf_counter() - t0, compiled.memory_analysis()
    effort = f" (exec effort {s.args.exec_effort:g})" if s.args.exec_effort else ""
    peak = compiled_gib(mem)
    fit = ""
    if target:
      hbm = setups.HBM_GIB[target]
      fit = f" of {hbm:.0f} GiB per chip: {'fits' if peak <= hbm else 'DOES NOT FIT'}"
    print(
      f"{mode:<18}: compile {seconds:.1f} s{effort}; arguments {mem.argument_size_in_bytes / 2**30:.2f} "
      f"GiB, temporaries {mem.temp_size_in_bytes / 2**30:.2f}; peak {peak:.2f} GiB{fit}",
      flush=True,
    )
    counts = collectives(compiled.as_text()) if mesh is not None and mesh.size > 1 else {}
    if counts:
      print(f"{'':<18}  collectives in the step: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    results[mode] = {"compile_s": seconds, "exec_effort": s.args.exec_effort, "peak_gib": peak, "collectives": counts}
    if target:
      results[mode].update(hbm_gib=setups.HBM_GIB[target], fits=peak <= setups.HBM_GIB[target])
  if mesh is not None:
    results["mesh"] = dict(mesh.shape)
  return results


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def collectives(hlo: str) -> dict[str, int]:
  """How many of each cross-device operation the compiled program holds (async pairs counted once). Static
  counts: one inside a loop (the attack's steps, a rollout's DDIM steps) runs once per trip."""
  counts = {}
  for op in COLLECTIVES:
    n = len(re.findall(rf"= [^=]*? {op}(?:-start)?\(", hlo))
    if n:
      counts[op] = n
  return counts


def compiled_gib(mem) -> float:
  """Arguments + outputs + temporaries, counting once the outputs that reuse donated argument buffers."""
  total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
  return total / 2**30


def time_torch(s: Harness) -> dict:
  import torch
  import transformers

  from advunlearn_jax.convert import clip_text as clip_convert
  from advunlearn_jax.testing import reference_torch

  args = s.args
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.set_float32_matmul_precision(args.torch_matmul_precision)
  unet = torch_unet.diffusers_unet(s.unet_cfg, s.unet_params, device)
  hf = transformers.CLIPTextConfig(**s.clip_cfg.to_transformers_dict())
  clips = []
  for _ in range(2):
    model = transformers.CLIPTextModel(hf).eval()
    model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in clip_convert.state_dict(s.clip_params, "").items()}, strict=False
    )
    clips.append(model.to(device))
  rng = np.random.default_rng(0)

  def draw(n):
    t_enc = int(rng.integers(0, DDIM_STEPS))
    t_ddpm = int(rng.integers(20 * t_enc, 20 * t_enc + 20))
    return reference_torch.Draw(t_enc, t_ddpm, torch.randn(n, 4, s.hw, s.hw, device=device))

  ids_c = torch.from_numpy(np.asarray(s.frozen.concept_ids)).long().to(device)
  retain_ids = torch.from_numpy(np.asarray(s.frozen.retain_ids[: args.retain_batch])).long().to(device)
  times, rollout_steps = [], []
  for _ in range(args.iters + 1):
    draws = reference_torch.Draws(
      [int(rng.integers(0, 49408))],
      [draw(1) for _ in range(args.attack_steps)],
      draw(1),
      torch.randn(args.retain_batch, 4, s.hw, s.hw, device=device),
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
    steps = [int(ddim.num_unet_steps(d.t_enc)) for d in draws.attack]
    d_steps = int(ddim.num_unet_steps(draws.defender.t_enc))
    rollout_steps.append(sum(steps) + 2 * d_steps)  # the attack's, then the concept's and the retain batch's
  if device == "cuda":
    print(
      f"pytorch peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, fp32 matmul precision "
      f"{args.torch_matmul_precision}",
      flush=True,
    )
  per_it = float(np.median(times[1:]))
  calls = float(np.mean(rollout_steps[1:]))
  # The transcription runs every frozen prediction on its own (e_p per attack step; e_0, e_p, r_p) where the
  # JAX step batches them into one call: 1 + A + 3 calls instead of 1.
  rest = loss_cost(args.attack_steps, 1, args.retain_batch)
  total_calls = calls + rest.calls - 1 + args.attack_steps + 3
  print(
    f"{'pytorch':<18}: {per_it:8.3f} s/it, {total_calls:6.1f} sequential UNet calls, FLOP efficiency 100.0% "
    "(reference transcription)",
    flush=True,
  )
  return {"s_per_iter": per_it, "sequential_unet_calls": float(total_calls), "flop_efficiency": 1.0}


if __name__ == "__main__":
  main()

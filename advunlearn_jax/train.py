"""AdvUnlearn training, top to bottom: config -> weights -> frozen setup -> state/restore -> loop -> export."""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from advunlearn_jax import checkpoint, config_lib, distributed, metrics_writer, preview, sharding
from advunlearn_jax import tokenizer as tok_lib
from advunlearn_jax.convert import clip_text as clip_convert
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import generation
from advunlearn_jax.models.clip_text import CLIPTextModel
from advunlearn_jax.models.unet import UNet2DConditionModel
from advunlearn_jax.unlearn import attack as attack_lib
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import frozen as frozen_lib
from advunlearn_jax.unlearn import prompts, retain, trainable
from advunlearn_jax.unlearn import step as step_lib

# Module level, so every run in a process (tests, population runs) shares one compilation per variant.
_TRAIN_STEP = jax.jit(step_lib.train_step, static_argnums=(0, 1, 5), donate_argnums=(2,))
# train.rollout_buckets = 0: batch widths of the batched online rollout by backend (README, "Speed").
ROLLOUT_BUCKETS = {"cpu": 8, "gpu": 8, "tpu": 8}


def rollout_rows_per_call(latent_hw: int, backend: str | None = None) -> int:
  """train.rollout_rows_per_call = -1: whole buckets per UNet call (0), except on CPUs at 16x16 latents and up,
  where a UNet call costs the same per row at any batch and least at a few rows (2 cores, 16x16: 3.2 ms a row at 8
  rows, 4.2 at 2, 4.7 at 72), so the walking points go 4 (8 CFG rows) per call. Measured in
  benchmarks/iteration.py: --size=tiny 1.04x online_sequential with 4 per call, 0.91x with 8 buckets;
  --size=small (8x8, where bigger batches are cheaper per row) 1.28x with buckets, 1.19x with 6 per call."""
  if (backend or jax.default_backend()) == "cpu" and latent_hw >= 16:
    return 4
  return 0


def bank_config(config: ml_collections.ConfigDict) -> bank_lib.BankConfig:
  b = config.bank
  return bank_lib.BankConfig(
    concept_trajectories=b.concept_trajectories,
    retain_trajectories=b.retain_trajectories,
    refresh_trajectories=b.refresh_trajectories,
    refresh_retain=b.refresh_retain,
    refresh_every=b.refresh_every,
  )


def step_config(config: ml_collections.ConfigDict, num_tokens: int, unet_config) -> step_lib.StepConfig:
  a = config.attack
  attack_cfg = attack_lib.AttackConfig(
    method=a.method,
    steps=a.steps,
    lr=a.lr,
    embedding=a.embedding,
    accumulate_grad=a.accumulate_grad,
    return_pre_final=a.return_pre_final,
    eps=a.eps,
    norm=a.norm,
  )
  attack_lib.validate(attack_cfg)
  if a.init not in attack_lib.INITS:
    raise ConfigError(f"config.attack.init is {a.init!r}; valid: {list(attack_lib.INITS)}")
  return step_lib.StepConfig(
    method=config.train.method,
    lr=config.train.lr,
    negative_guidance=config.diffusion.negative_guidance,
    start_guidance=config.diffusion.start_guidance,
    concept_batch=config.train.concept_batch,
    retain_batch=config.retain.batch,
    retain_mode=config.retain.mode,
    retain_weight=config.retain.weight,
    retain_steps=config.retain.steps,
    attack=attack_cfg,
    attack_init=a.init,
    latest_init_quirk=a.latest_init_quirk,
    num_tokens=num_tokens,
    latent_hw=unet_config.sample_size,
    latent_channels=unet_config.in_channels,
    xt_source=config.train.xt_source,
    rollout_buckets=config.train.rollout_buckets or ROLLOUT_BUCKETS.get(jax.default_backend(), 8),
    rollout_rows_per_call=(
      config.train.rollout_rows_per_call
      if config.train.rollout_rows_per_call >= 0
      else rollout_rows_per_call(unet_config.sample_size)
    ),
    bank=bank_config(config),
  )


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.validate(config)
  trainable.validate_method(config.train.method, config.train.component)
  bank_lib.check_method(config.train.method, config.train.xt_source)
  bank_lib.validate(bank_config(config))
  if config.train.rollout_buckets < 0 or config.train.rollout_rows_per_call < -1:
    raise ConfigError(
      "config.train.rollout_buckets must be >= 0 and config.train.rollout_rows_per_call >= -1 (0 and -1: the "
      f"measured defaults), got {config.train.rollout_buckets} and {config.train.rollout_rows_per_call}"
    )
  if config.attack.type not in prompts.ATTACK_TYPES:
    raise ConfigError(f"config.attack.type is {config.attack.type!r}; valid: {list(prompts.ATTACK_TYPES)}")


def _trajectory_bank(config, cfg, models, frozen, mesh, abstract: bool) -> bank_lib.Bank:
  """The bank, replicated on the mesh; `abstract`: only its shapes and placement (the template a checkpoint's
  bank is restored into). Its key, fold_in(root, 2**32 - 1), is one no iteration uses."""
  build = lambda key: bank_lib.build(
    models.unet,
    frozen.unet,
    frozen,
    key,
    cfg.bank,
    latent_shape=(cfg.latent_hw, cfg.latent_hw, cfg.latent_channels),
    guidance=cfg.start_guidance,
  )
  key = jax.random.fold_in(jax.random.key(config.seed), 2**32 - 1)
  if abstract:
    replicated = NamedSharding(mesh, PartitionSpec())
    shapes = jax.eval_shape(build, key)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
  t0 = time.perf_counter()
  bank = sharding.replicate(build(sharding.replicate(key, mesh)), mesh)
  logging.info("trajectory bank built in %.1fs: %s", time.perf_counter() - t0, jax.tree.map(jnp.shape, bank))
  return bank


def fsdp_size(config: ml_collections.ConfigDict, devices: list | None = None) -> int:
  """config.mesh.fsdp, or by default: 1 (data parallel) for text-encoder methods, whose trained tower is small;
  for UNet methods every device of a host shares the UNet's parameters and Adam state (the fast links)."""
  n = len(devices or jax.devices())
  if config.mesh.fsdp:
    if n % config.mesh.fsdp:
      raise ConfigError(f"config.mesh.fsdp={config.mesh.fsdp} does not divide the {n} devices")
    return config.mesh.fsdp
  if trainable.is_text_method(config.train.method):
    return 1
  return math.gcd(n, jax.local_device_count())


def _to_host(tree: Any) -> Any:
  """Global arrays as numpy on every process; across processes this is a collective, so all must call it."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _current_params(cfg, models, frozen, pipe: sd_convert.Pipeline, state) -> tuple[Any, Any]:
  """(text, UNet) params now: only the trained leaves come off the mesh; the untrained ones are the pipeline's
  own local fp32 copies (frozen.clip/unet on the mesh hold the same values, possibly sharded across hosts and
  with the UNet's kernels in the compute dtype)."""
  local = frozen._replace(unet=pipe.unet_params, clip=pipe.text_params)
  return step_lib.student_params(cfg, models, local, _to_host(state.params))


class PreemptionWatcher:
  """SIGTERM (a preempted VM, a cluster scheduler) asks the loop to save and stop at the next iteration."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  devices: list | None = None,
  preemption: PreemptionWatcher | None = None,
  show_progress: bool = True,
) -> dict[str, Any]:
  """Trains, checkpoints, resumes, and exports `workdir/text_encoder` and `workdir/pipeline`.

  `devices` (default: all) form the run's data mesh; a population gives each member its own group.
  `preemption`: a SIGTERM watcher shared by several runs in one process (signal handlers live in the main
  thread); by default a single-process run installs its own."""
  # ---------------------------------------------------------------- config and weights
  validate(config)
  root = sd_convert.resolve_pretrained(config_lib.resolve_pretrained(config.model.pretrained))
  primary = distributed.is_primary()  # the one process that writes metrics, grids and exports
  with_previews = config.samples.every > 0 and os.path.isdir(os.path.join(root, "vae"))
  pipe = sd_convert.load_pipeline(root, with_vae=with_previews)
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  retain_prompts = list(config.retain.prompts) or retain.load_prompts(config.retain.csv)
  dtype = jnp.dtype(config.model.dtype)

  # ---------------------------------------------------------------- frozen setup
  frozen, num_tokens = frozen_lib.build(
    clip_config=pipe.text_config,
    clip_params=pipe.text_params,
    unet_params=pipe.unet_params,
    tokenizer=tokenizer,
    concepts=list(config.concept.prompts),
    retain_prompts=retain_prompts,
    attack_type=config.attack.type,
    num_tokens=config.attack.num_tokens,
    faithful_word_split=config.attack.faithful_word_split,
    schedule=pipe.schedule,
    ddim_steps=config.diffusion.ddim_steps,
  )
  if config.retain.batch > len(retain_prompts):
    raise ConfigError(f"config.retain.batch ({config.retain.batch}) exceeds the {len(retain_prompts)} retain prompts")
  if config.bank.refresh_retain > len(retain_prompts):
    raise ConfigError(
      f"config.bank.refresh_retain ({config.bank.refresh_retain}) exceeds the {len(retain_prompts)} retain prompts"
    )
  text_mask = trainable.text_encoder_mask(
    pipe.text_params, config.train.method, config.train.component, config.train.norm_layer, config.train.prefix_bug
  )
  unet_mask = trainable.unet_mask(pipe.unet_params, config.train.method)
  mesh = sharding.make_mesh(devices, fsdp_size(config, devices))
  models = step_lib.Models(
    CLIPTextModel(pipe.text_config, dtype=dtype),
    UNet2DConditionModel(pipe.unet_config, dtype=dtype, remat_policy=config.model.remat),
    trainable.selected_paths(text_mask),
    trainable.selected_paths(unet_mask),
    mesh,
  )
  frozen = frozen_lib.store_for_compute(frozen, models)
  weights = {"unet": sharding.shard_params(frozen.unet, mesh), "clip": sharding.shard_params(frozen.clip, mesh)}
  frozen = sharding.replicate(frozen._replace(unet=None, clip=None), mesh)._replace(**weights)
  cfg = step_config(config, num_tokens, pipe.unet_config)
  n_trained = trainable.count(pipe.text_params, text_mask) + trainable.count(pipe.unet_params, unet_mask)
  logging.info("training %s: %s parameters on mesh %s", config.train.method, f"{n_trained:,}", dict(mesh.shape))

  # ---------------------------------------------------------------- state or restore
  os.makedirs(workdir, exist_ok=True)
  config_json = checkpoint.config_dict(config)
  mngr = checkpoint.manager(workdir, config.train.keep)
  resuming = mngr.latest_step() is not None
  bank = None
  if config.train.xt_source == "bank":  # a checkpoint holds the bank: restore it rather than roll it out again
    bank = _trajectory_bank(config, cfg, models, frozen, mesh, abstract=resuming)
  state = sharding.shard_params(step_lib.init_state(cfg, models, frozen), mesh)._replace(bank=bank)
  logging.info(
    "frozen weights + training state: %.2f GB per device",
    sharding.bytes_per_device((weights, state), mesh) / 1e9,
  )
  sampler = retain.SamplerState(0, 0)
  restored = checkpoint.restore_latest(mngr, state, config_json, workdir)
  if restored is not None:
    state, meta = restored
    state = sharding.shard_params(state._replace(bank=None), mesh)._replace(bank=state.bank)  # the bank: replicated
    sampler = retain.SamplerState(*meta["retain_sampler"])
    logging.info("resumed from step %d", int(state.step))
  start = int(state.step)

  # ---------------------------------------------------------------- loop
  root_key = sharding.replicate(jax.random.key(config.seed), mesh)
  own_watcher = preemption is None and jax.process_count() == 1  # several processes: JAX's own service
  if own_watcher:
    preemption = PreemptionWatcher()
  writer = metrics_writer.MetricsWriter(workdir, enabled=primary)
  previews = None
  if with_previews and primary:
    sample_prompts = list(config.samples.prompts) or [
      *config.concept.prompts,
      *retain_prompts[: config.samples.retain_prompts],
    ]
    previews = preview.Preview(
      pipe, sample_prompts, seed=config.samples.seed, steps=config.samples.steps, guidance=config.samples.guidance
    )

  def write_preview(step_count):
    text_params, unet_params = _current_params(cfg, models, frozen, pipe, state)
    if not primary:
      return
    if trainable.is_text_method(config.train.method):
      grid = previews.grid(text_params=text_params)
    else:
      grid = previews.grid(unet_params=unet_params)
    generation.save_png(os.path.join(workdir, "samples", f"step_{step_count:06d}.png"), grid)
    writer.image(step_count, "samples/original_vs_current", grid)

  def save(step_count):
    meta = {
      "config": config_json,
      "retain_sampler": list(sampler),
      "step": step_count,
      "versions": {"jax": jax.__version__},
    }
    checkpoint.save(mngr, step_count, state, meta)

  iterations = config.train.iterations
  progress = _progress(start, iterations, enabled=primary and show_progress)
  last_time, last_step = time.perf_counter(), start
  try:
    for i in range(start, iterations):
      idx, sampler = retain.sample(sampler, len(retain_prompts), cfg.retain_batch, config.seed)
      batch = sharding.replicate(step_lib.Batch(np.asarray(idx, np.int32), jax.random.fold_in(root_key, i)), mesh)
      state, metrics = _TRAIN_STEP(cfg, models, state, frozen, batch, i >= config.train.warmup_iters)
      done = i + 1
      if done % config.train.log_every == 0 or done == iterations:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(values["loss"]):
          save(done)
          raise FloatingPointError(f"loss is {values['loss']} at step {done}; state saved for inspection")
        now = time.perf_counter()
        values["it_per_s"] = (done - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, done
        writer.scalars(done, values)
        progress.update(done, values)
      if with_previews and (done % config.samples.every == 0 or done == iterations):
        write_preview(done)
      stop = distributed.preemption_agreed(done, preemption is not None and preemption.requested)
      if done % config.train.save_every == 0 or done == iterations or stop:
        save(done)
      if stop:
        mngr.wait_until_finished()
        logging.warning("SIGTERM: saved step %d, stopping; rerun the same command to resume", done)
        return {"stopped_at": done, "workdir": workdir}
  finally:
    if own_watcher:
      preemption.restore()
    progress.close()
    writer.close()
    mngr.wait_until_finished()

  # ---------------------------------------------------------------- export
  text_params, unet_params = _current_params(cfg, models, frozen, pipe, state)
  if not trainable.is_text_method(config.train.method):
    text_params = None
  outputs = export(workdir, pipe, text_params, unet_params, write=primary)
  distributed.sync("advunlearn export")  # no process leaves before the exports exist
  summary = {
    "workdir": workdir,
    **outputs,
    "iterations": iterations,
    "resumed_from": start,
    "trained_parameters": n_trained,
    "mesh": dict(mesh.shape),
    "state_fsdp_fraction": sharding.sharded_fraction(state),
  }
  if primary:
    print("done: " + ", ".join(f"{k} in {v}" for k, v in outputs.items()))
  return summary


def export(
  workdir: str, pipe: sd_convert.Pipeline, text_params: Any = None, unet_params: Any = None, write: bool = True
) -> dict[str, str]:
  """The trained component (`workdir/text_encoder` for CLIPTextModel.from_pretrained, or `workdir/unet` for the
  ESD-style UNet methods) and `workdir/pipeline`, the source pipeline with it, for
  StableDiffusionPipeline.from_pretrained (other components hard-linked where possible). `write=False` (the
  non-primary processes of a multi-host run) only returns the paths."""
  name = "text_encoder" if text_params is not None else "unet"
  component_dir, pipeline_dir = os.path.join(workdir, name), os.path.join(workdir, "pipeline")
  if not write:
    return {name: component_dir, "pipeline": pipeline_dir}
  if text_params is not None:
    clip_convert.export_clip_text(pipe.text_config, text_params, component_dir)
  else:
    sd_convert.export_unet(pipe.unet_config, unet_params, component_dir)
  with weights_io.atomic_folder(pipeline_dir) as staging:
    os.rmdir(staging)
    shutil.copytree(pipe.root, staging, ignore=shutil.ignore_patterns(name, ".cache"), copy_function=_link_or_copy)
    shutil.copytree(component_dir, os.path.join(staging, name))
  return {name: component_dir, "pipeline": pipeline_dir}


def _link_or_copy(src: str, dst: str) -> None:
  src = os.path.realpath(src)  # hub snapshots hold symlinks into the blob store
  try:
    os.link(src, dst)
  except OSError:
    shutil.copy2(src, dst)


class _progress:
  """A tqdm bar over iterations showing loss, attack loss and it/s (plain log lines when tqdm is absent)."""

  def __init__(self, start: int, total: int, enabled: bool = True):
    self.bar, self.enabled, self.position = None, enabled, start
    if not enabled:  # a non-primary process of a multi-host run
      return
    try:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, initial=start, desc="AdvUnlearn", unit="it")
    except ImportError:
      self.bar = None

  def update(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    shown = {k: f"{values[k]:.4g}" for k in ("loss", "attack_loss_last", "it_per_s") if k in values}
    if self.bar is not None:
      self.bar.update(step - self.position)
      self.bar.set_postfix(shown)
    else:
      logging.info("step %d %s", step, shown)
    self.position = step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

"""AdvUnlearn training, top to bottom: set up (weights, the wired step, the mesh) -> restore or start -> loop
-> finish. What the run's trained tower becomes (run_exports.RunExports) and the report its config asks for are the
command's (runs.py), handed the tower through `export`."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from advunlearn_jax import sharding
from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError, TrainingDiverged
from advunlearn_jax.models.pipeline_record import Pipeline, SDXLPipeline
from advunlearn_jax.training import checkpoint, distributed, loss_plot, metrics_writer, preview, stages, workdir_lock
from advunlearn_jax.training.run_exports import Snapshot
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import retain, threats, wiring
from advunlearn_jax.unlearn import step as step_lib


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
  distributed.announce(f"trajectory bank rolled out in {time.perf_counter() - t0:.1f}s")
  return bank


def _current_params(setup: Setup, state) -> tuple[Any, Any]:
  """(text, UNet) params now: only the trained leaves come off the mesh; the untrained ones are the pipeline's
  own local fp32 copies (frozen.clip/unet on the mesh hold the same values, possibly sharded across hosts and
  with the UNet's kernels in the compute dtype)."""
  cfg, models, frozen, _ = setup.wired
  local = frozen._replace(unet=setup.pipe.unet_params, clip=setup.pipe.text_tree)
  return step_lib.student_params(cfg, models, local, distributed.to_host(state.params))


class PreemptionWatcher:
  """SIGTERM (a preempted VM, a cluster scheduler) or SIGINT (Ctrl-C) asks the loop to save and stop at the next
  iteration; `signal_name` says which came first. A second Ctrl-C stops at once (KeyboardInterrupt), for a user
  who will not wait for the save."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested, self.signal_name = False, ""
    self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.requested, self.signal_name = True, self.signal_name or signal.Signals(signum).name

  def restore(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


class Setup(NamedTuple):
  """What the run reads and never changes."""

  pipe: Pipeline | SDXLPipeline
  retain_prompts: list[str]
  wired: wiring.Wiring
  mesh: jax.sharding.Mesh
  primary: bool  # the one process that writes metrics, grids and exports
  with_previews: bool
  threats: tuple = ()  # attack.mix: (StepConfig, Frozen) per member (wiring.threat); (): wired's alone


class Progress(NamedTuple):
  """What the loop changes: the state and the retain sampler's cursor."""

  state: step_lib.TrainState
  sampler: retain.SamplerState


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  sections: wiring.TrainingSections,
  devices: list | None = None,
  preemption: PreemptionWatcher | None = None,
  show_progress: bool = True,
  export: Callable[[Snapshot], dict[str, str]] | None = None,
) -> dict[str, Any]:
  """Trains, checkpoints and resumes; hands the trained tower to `export` every `export.every` iterations and
  at the end (run_exports.RunExports writes `workdir/text_encoder` or `unet`, and `workdir/pipeline`; runs.run
  passes it), under the workdir's lock. Returns the run's summary with `export`'s paths.

  `sections`: what config_validation.validate(config) built; the caller checks the whole config before any work.

  `devices` (default: all) form the run's data mesh; a population gives each member its own group.
  `preemption`: a SIGTERM watcher shared by several runs in one process (signal handlers live in the main
  thread); by default a single-process run installs its own."""
  os.makedirs(workdir, exist_ok=True)
  # One run per workdir (process 0 of a multi-host run holds it for all): a second one refuses before any work.
  with workdir_lock.WorkdirLock(workdir, enabled=distributed.is_primary()):
    setup = set_up(config, sections, devices, root=stages.base_root(config, workdir))
    mngr = checkpoint.manager(workdir, config.train.keep)
    try:
      progress = restore_or_start(config, setup, mngr, workdir)
      start = int(progress.state.step)
      progress, stopped = loop(config, setup, mngr, workdir, progress, preemption, show_progress, export)
    finally:
      mngr.wait_until_finished()
    if stopped:
      return {"stopped_at": int(progress.state.step), "workdir": workdir, "signal": stopped}
    return finish(config, setup, workdir, progress.state, start, export)


def set_up(
  config: ml_collections.ConfigDict,
  sections: wiring.TrainingSections,
  devices: list | None = None,
  root: str | None = None,
) -> Setup:
  """`root`: the folder the weights come from (stages.base_root); default model.pretrained's."""
  retain_prompts = retain.from_config(config)
  root = root or sd_convert.resolve_pretrained(config.model.pretrained)
  check_sdxl_run(config, root)  # before any weights are read
  with_previews = config.samples.every > 0 and os.path.isdir(os.path.join(root, "vae"))
  members = threats.member_configs(config)
  with_images = any(c.attack.objective != "esd" for c in (config, *members))
  pipe = sd_convert.load_either(root, with_vae=with_previews or with_images)
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  mesh = sharding.make_mesh(devices, sharding.fsdp_size(config.mesh.fsdp, sections.trained.tower, devices))
  inputs = dict(
    tokenizer=tokenizer,
    retain_prompts=retain_prompts,
    mesh=mesh,
    concept_latents=concept_latents(config, pipe) if with_images else None,
  )
  if isinstance(pipe, SDXLPipeline):
    wired = wiring.wire_sdxl(config, sections, pipe, tokenizer_2=tok_lib.load_tokenizer(pipe.tokenizer_2_dir), **inputs)
  else:
    wired = wiring.wire_pipeline(config, sections, pipe, **inputs)
  primary = distributed.is_primary()
  distributed.announce(
    f"training {config.train.method}: {wired.trained_parameters:,} parameters on mesh {dict(mesh.shape)}, "
    f"x_t from {config.train.xt_source}",
  )
  members = tuple(wiring.threat(member, wired, tokenizer, mesh) for member in members)
  return Setup(pipe, retain_prompts, wired, mesh, primary, with_previews, members)


def check_sdxl_run(config: ml_collections.ConfigDict, root: str) -> None:
  """What an SDXL folder (`root`) cannot give, refused before any weights are read (ConfigError names the key);
  nothing for an SD folder. Reads only the UNet's config."""
  if not os.path.isfile(os.path.join(root, "model_index.json")) or not sd_convert.is_sdxl_folder(root):
    return  # not a pipeline folder: the loader says what it lacks
  if config.stereo.enabled:
    raise ConfigError(
      f"config.stereo.enabled: {root} is an SDXL folder; STEREO runs here as its authors run it, on SD 1.x "
      "UNets only (set it to False to train AdvUnlearn on SDXL's text towers)"
    )
  wiring.check_sdxl_attack(config)
  if config.export.reference_checkpoint:
    raise ConfigError(
      f"config.export.reference_checkpoint: {root} is an SDXL folder; the reference's TextEncoder-*.pt holds SD "
      "1.x's one text encoder. An SDXL run exports both towers as diffusers folders (set it to False)"
    )


TRAINING_IMAGES_STREAM = 2**20


def concept_latents(config: ml_collections.ConfigDict, pipe) -> np.ndarray | None:
  """attack.objective inversion/both (of the run or an attack.mix member): the concept's images (attack.images,
  else evaluation.inversion.images) as scaled VAE posterior means, encoded once. Means, not CCE's sampled and
  flipped posteriors: the inner attack sees a fresh t and noise every step, and its images stay the same each
  round, so a resumed run draws what an uninterrupted one does."""
  from advunlearn_jax.evals import inversion

  key = "attack.images" if config.attack.images else "evaluation.inversion.images"
  source = config.attack.images or config.evaluation.inversion.images
  size = generation.image_size(pipe)
  # Squashed whole, as CCE loads its images (center_crop=False), and rendered from a stream of their own: the tiny
  # world's renders at the run's seed are the ones the evaluation's CCE trains on.
  seed = TRAINING_IMAGES_STREAM + config.seed
  images = inversion.concept_images(source, config.attack.max_images, size, seed=seed, center_crop=False, key=key)
  means = [
    generation.encode_means(pipe.vae_config, pipe.vae_params, jnp.asarray(chunk, jnp.float32) / 127.5 - 1.0)
    for chunk in np.array_split(images, max(1, len(images) // 16))
  ]
  return np.asarray(jnp.concatenate(means)) * pipe.vae_config.scaling_factor


def restore_or_start(config: ml_collections.ConfigDict, setup: Setup, mngr, workdir: str) -> Progress:
  """The latest checkpoint that reads back whole (checkpoint.py), or a fresh state. A checkpoint holds the bank,
  so a resumed bank run does not roll it out again."""
  cfg, models, frozen, _ = setup.wired
  resuming = bool(mngr.all_steps())
  bank = None
  if cfg.xt_source == "bank":
    bank = _trajectory_bank(config, cfg, models, frozen, setup.mesh, abstract=resuming)
  state = wiring.lay_out_state(step_lib.init_state(cfg, models, frozen), setup.mesh)._replace(bank=bank)
  footprint = sharding.bytes_per_device((frozen.unet, frozen.clip, state), setup.mesh) / 1e9
  distributed.announce(f"frozen weights + training state: {footprint:.2f} GB per device")
  restored = checkpoint.restore_latest(mngr, state, checkpoint.config_dict(config), workdir)
  if restored is None:
    return Progress(state, retain.SamplerState(0, 0))
  state, meta = restored
  state = wiring.lay_out_state(state._replace(bank=None), setup.mesh)._replace(bank=state.bank)  # as restored
  distributed.announce(f"resumed from step {int(state.step)}")
  return Progress(state, retain.SamplerState(*meta["retain_sampler"]))


def loop(
  config: ml_collections.ConfigDict,
  setup: Setup,
  mngr,
  workdir: str,
  progress: Progress,
  preemption: PreemptionWatcher | None,
  show_progress: bool,
  export: Callable[[Snapshot], dict[str, str]] | None = None,
) -> tuple[Progress, str]:
  """Iterations from the state's step to train.iterations; (progress, the signal that stopped it or '').

  A state whose loss terms or parameters stopped being finite is never checkpointed or exported: the step
  carries the first non-finite iteration (step.TrainState.diverged_at), read before every save and export and at
  log steps, and the run stops there with TrainingDiverged, its checkpoints as they were."""
  cfg, models, frozen, _ = setup.wired
  iterations, start = config.train.iterations, int(progress.state.step)
  root_key = sharding.replicate(jax.random.key(config.seed), setup.mesh)
  own_watcher = preemption is None and jax.process_count() == 1  # several processes: JAX's own service
  if own_watcher:
    preemption = PreemptionWatcher()
  writer = metrics_writer.MetricsWriter(workdir, enabled=setup.primary, resume_step=start)
  plot = loss_plot.LossPlot(workdir, config.train.warmup_iters, enabled=setup.primary)
  previews = _previews(config, setup) if setup.with_previews else None
  bar = _progress(start, iterations, enabled=setup.primary and show_progress)
  last_time, last_step = time.perf_counter(), start
  state, sampler = progress
  try:
    for i in range(start, iterations):
      batch, sampler = iteration_batch(config, cfg, i, root_key, sampler, len(setup.retain_prompts))
      batch = sharding.replicate(batch, setup.mesh)
      with_attack = i >= config.train.warmup_iters
      # Warm-up has no adversarial prompt to reuse: one compiled warm-up step whatever the period.
      new_prompt = not with_attack or prompt_update(i, config.train.warmup_iters, config.attack.update_every) == i
      threat = threat_of(config, setup, i) if with_attack else None
      step_cfg, step_frozen = setup.threats[threat] if threat is not None else (cfg, frozen)
      state, metrics = wiring.train_step(
        step_cfg, models, state, step_frozen, batch, with_attack, new_prompt=new_prompt
      )
      done = i + 1
      if done % config.train.log_every == 0 or done == iterations:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if threat is not None:
          values["threat"] = threat
        if not all(np.isfinite(values[k]) for k in step_lib.LOSS_TERMS):
          ensure_finite(config, mngr, state)  # raises, naming the first non-finite iteration
        now = time.perf_counter()
        values["it_per_s"] = (done - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, done
        writer.scalars(done, values)
        plot.update()
        bar.update(done, values)
      if setup.with_previews and (done % config.samples.every == 0 or done == iterations):
        _write_preview(config, setup, previews, writer, workdir, done, state)
      if export is not None and config.export.every and done % config.export.every == 0:
        ensure_finite(config, mngr, state)
        export(_snapshot(setup, state, done, final=False))  # every process: a collective across hosts
      stop = distributed.preemption_agreed(done, preemption is not None and preemption.requested)
      if done % config.train.save_every == 0 or done == iterations or stop:
        _save(config, mngr, done, Progress(state, sampler))
      if stop:
        mngr.wait_until_finished()
        name = (preemption.signal_name if preemption is not None else "") or "SIGTERM"  # multi-host: JAX's notice
        distributed.announce(f"{name}: saved step {done}, stopping; rerun the same command to resume", warning=True)
        return Progress(state, sampler), name
  finally:
    if own_watcher:
      preemption.restore()
    bar.close()
    writer.close()
    plot.update(force=True)
  return Progress(state, sampler), ""


def ensure_finite(config: ml_collections.ConfigDict, mngr, state) -> None:
  """TrainingDiverged unless every loss term so far and every trained tensor is finite: one host read of the flag
  the step carries and one reduction over the parameters, made only where a save or an export is about to be."""
  at, losses = jax.device_get((state.diverged_at, state.diverged_losses))
  if at:
    terms = ", ".join(f"{k} {v:.4g}" for k, v in zip(step_lib.LOSS_TERMS, losses))
    raise TrainingDiverged(f"training diverged at iteration {int(at)} ({terms}); {_kept(config, mngr)}")
  bad, total = checkpoint.nonfinite((state.params, state.opt_state))
  if bad:
    raise TrainingDiverged(
      f"training diverged by iteration {int(state.step)}: {bad} of {total} tensors of the parameters and Adam "
      f"state hold NaN or infinity, though every loss term was finite; {_kept(config, mngr)}"
    )


def _kept(config: ml_collections.ConfigDict, mngr) -> str:
  mngr.wait_until_finished()
  latest = mngr.latest_step()
  kept = f"the last checkpoint, step {latest}, is untouched" if latest is not None else "no checkpoint was written"
  return (
    f"nothing after it was saved or exported, and {kept}. A lower config.train.lr (now {config.train.lr:g}) in a "
    "new --workdir may train"
  )


def prompt_update(i: int, warmup_iters: int, update_every: int) -> int:
  """The iteration whose concept and adversarial prompt iteration `i` uses: the latest multiple of
  `attack.update_every` (the reference's --adv_prompt_update_step), or the first iteration after warm-up, which
  must search one (the reference would fail there for lack of an adversarial prompt)."""
  latest = i - i % update_every
  return warmup_iters if latest < warmup_iters <= i else latest


def threat_of(config: ml_collections.ConfigDict, setup: Setup, i: int) -> int | None:
  """The attack.mix member iteration i (past warm-up) attacks with; None without a mix."""
  if not setup.threats:
    return None
  attack_round_i = attack_round(i, config.train.warmup_iters, config.attack.update_every)
  return threats.draw(config.seed, attack_round_i, len(setup.threats))


def attack_round(i: int, warmup_iters: int, update_every: int) -> int:
  """Which attack round (0: the first, right after warm-up) iteration i >= warmup_iters uses."""
  return prompt_update(i, warmup_iters, update_every) // update_every - warmup_iters // update_every


def iteration_batch(config, cfg, i: int, root_key, sampler: retain.SamplerState, n_prompts: int):
  """Iteration i's keys and retain prompts, and the sampler after them. Retain mode iter draws a batch for each
  extra step (retain.fresh_per_step, as the reference) or one batch for all of them."""
  draw = lambda sampler: retain.sample(sampler, n_prompts, cfg.retain.batch, config.seed)
  key = jax.random.fold_in(root_key, i)
  t, a = config.train, config.attack
  prompt_key = jax.random.fold_in(root_key, prompt_update(i, t.warmup_iters, a.update_every))
  restart = None
  if a.restart_every:  # decided here from i alone, so a resumed run restarts where an uninterrupted one does
    restart = np.asarray(i >= t.warmup_iters and attack_round(i, t.warmup_iters, a.update_every) % a.restart_every == 0)
  if cfg.retain.mode == "reg":
    idx, sampler = draw(sampler)
    return step_lib.Batch(np.asarray(idx, np.int32), key, prompt_key, restart=restart), sampler
  draws = []
  for _ in range(cfg.retain.steps if cfg.retain.fresh_per_step else 1):
    idx, sampler = draw(sampler)
    draws.append(idx)
  iter_idx = np.stack(draws) if len(draws) == cfg.retain.steps else np.repeat(draws[0][None], cfg.retain.steps, 0)
  return step_lib.Batch(np.zeros((0,), np.int32), key, prompt_key, iter_idx.astype(np.int32), restart), sampler


def finish(
  config: ml_collections.ConfigDict,
  setup: Setup,
  workdir: str,
  state,
  start: int,
  export: Callable[[Snapshot], dict[str, str]] | None = None,
) -> dict[str, Any]:
  """The run's summary, after `export` has the trained tower."""
  outputs = {}
  if export is not None:
    outputs = export(_snapshot(setup, state, config.train.iterations, final=True))
    distributed.sync("advunlearn export")  # no process leaves before the exports exist
  summary = {
    "workdir": workdir,
    **outputs,
    "iterations": config.train.iterations,
    "resumed_from": start,
    "trained_parameters": setup.wired.trained_parameters,
    "mesh": dict(setup.mesh.shape),
    "state_fsdp_fraction": sharding.sharded_fraction(state),
  }
  if setup.primary and outputs:
    print("done: " + ", ".join(f"{k} in {v}" for k, v in outputs.items()))
  return summary


def _snapshot(setup: Setup, state, step_count: int, final: bool) -> Snapshot:
  trained = setup.wired.models.trained
  return Snapshot(step_count, setup.pipe, trained.tower, trained.of(*_current_params(setup, state)), final)


def _save(config: ml_collections.ConfigDict, mngr, step_count: int, progress: Progress) -> None:
  ensure_finite(config, mngr, progress.state)
  meta = {
    "config": checkpoint.config_dict(config),
    "retain_sampler": list(progress.sampler),
    "step": step_count,
    "versions": {"jax": jax.__version__},
  }
  checkpoint.save(mngr, step_count, progress.state, meta)


def _previews(config: ml_collections.ConfigDict, setup: Setup) -> preview.Preview | None:
  if not setup.primary:
    return None
  prompts = list(config.samples.prompts) or [
    *config.concept.prompts,
    *setup.retain_prompts[: config.samples.retain_prompts],
  ]
  s = config.samples
  return preview.Preview(setup.pipe, prompts, seed=s.seed, steps=s.steps, guidance=s.guidance)


def _write_preview(config, setup: Setup, previews, writer, workdir: str, step_count: int, state) -> None:
  text_params, unet_params = _current_params(setup, state)  # every process: a collective across hosts
  if previews is None:
    return
  grid = previews.grid(text_params=text_params, unet_params=unet_params)  # the untrained one is the original
  generation.save_png(os.path.join(workdir, "samples", f"step_{step_count:06d}.png"), grid)
  writer.image(step_count, "samples/original_vs_current", grid)


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
      print(f"step {step} {shown}", flush=True)
    self.position = step

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()

"""STEREO as its authors run it (koushiksrivats/robust-concept-erasing at 86f124f, utils/stereo.py `stereo`): the
`main` command's run when config.stereo.enabled. Settings: config_lib's `stereo` section (each with its file:line).

Stage 1, STE (stereo.py:264-357), `stereo.rounds` rounds on one UNet that carries over from round to round
(stereo.py:317): ESD-erase the round's prompt (round 0: the concept; round r: round r-1's learned token alone,
stereo.py:342), then textual inversion (CCE's trainer, evals/inversion.py) against the erased UNet on the round's
share of the gallery (utils/dataset.py: N // rounds images each); the learned token is collected.
Stage 2, REO (stereo.py:360-499, setup :530-575): from the ORIGINAL UNet, one run against the concept and the
first `adv_concepts` tokens together, one anchor sentence per step (both stratified, stereo.py:376-397).

State: workdir/stereo/state.json (written atomically after each round and after REO) names what is done; a rerun
resumes after the last finished round (an interrupted round runs again from the previous round's weights) and
refuses a workdir whose state was written under another config. The final UNet: workdir/unet and
workdir/pipeline (run_exports.write), as an ESD-style run writes them. Each finished stage (a round's erase, its
inversion, REO) appends its wall seconds and its first step's to workdir/stereo/timing.jsonl, whence
`steady_seconds`, the training time without compilation that the benchmarks compare.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from advunlearn_jax.convert import diffusers as sd_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.diffusion import generation
from advunlearn_jax.diffusion.text_side import TextSide
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import inversion
from advunlearn_jax.models.clip_text import CLIPTextModel
from advunlearn_jax.models.unet import UNet2DConditionModel
from advunlearn_jax.training import checkpoint, run_exports, workdir_lock
from advunlearn_jax.unlearn import stereo, trainable

STATE = "state.json"
TIMING = "timing.jsonl"


# ---------------------------------------------------------------------------------------------- settings


def anchors_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """stereo.anchors, else anchor_file[concept.prompts[0]] (stereo.py:363-364 keys by the erase concept; a concept
  the file lacks fails there with a KeyError, here before any work)."""
  s = config.stereo
  if s.anchors:
    return tuple(str(a) for a in s.anchors)
  if not s.anchor_file:
    raise ConfigError("config.stereo.anchors is empty and config.stereo.anchor_file is ''; REO needs anchor prompts")
  try:
    with open(s.anchor_file) as f:
      table = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.stereo.anchor_file={s.anchor_file!r}: not a readable JSON file ({e})") from e
  concept = config.concept.prompts[0]
  found = table.get(concept) if isinstance(table, dict) else None
  if not found or not all(isinstance(a, str) for a in found):
    raise ConfigError(
      f"config.stereo.anchor_file={s.anchor_file!r} has no list of anchor prompts for {concept!r} (the concept's "
      "first prompt, as their code keys it); give config.stereo.anchors"
    )
  return tuple(found)


def validate(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Every stereo.* setting, before any work (ConfigError naming the key); returns the anchor prompts."""
  s = config.stereo
  for key, low, inclusive in (
    ("rounds", 1, True),
    ("iterations", 1, True),
    ("ste_lr", 0, False),
    ("reo_lr", 0, False),
    ("weight_decay", 0, True),
    ("negative_guidance", 0, True),
    ("compositional_guidance", 0, False),
    ("start_guidance", 0, True),
    ("sample_steps", 3, True),
    ("adv_concepts", 0, True),
    ("max_images", 1, True),
    ("ti_steps", 1, True),
    ("ti_lr", 0, False),
  ):
    value = s[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
      raise ConfigError(f"config.stereo.{key} is {value!r}; expected a number")
    if value < low or (value == low and not inclusive):
      raise ConfigError(f"config.stereo.{key} must be {'>=' if inclusive else '>'} {low}, got {value}")
  if s.method not in trainable.UNET_METHODS:
    raise ConfigError(f"config.stereo.method is {s.method!r}; STEREO trains the UNet: one of {trainable.UNET_METHODS}")
  if s.adv_concepts > s.rounds:
    raise ConfigError(f"config.stereo.adv_concepts={s.adv_concepts} exceeds stereo.rounds={s.rounds} (one token each)")
  if not s.initializer.strip():
    raise ConfigError("config.stereo.initializer is empty: --initializer_token, one vocabulary word (README: person)")
  if s.templates not in inversion.TEMPLATES:
    raise ConfigError(f"config.stereo.templates is {s.templates!r}; expected one of {list(inversion.TEMPLATES)}")
  if s.max_images < s.rounds:
    raise ConfigError(f"config.stereo.max_images={s.max_images} gives no image to some of {s.rounds} rounds")
  inversion.check_image_source(s.images, "stereo.images")
  if not config.concept.prompts:
    raise ConfigError("config.concept.prompts is empty: the concept STEREO erases")
  return anchors_of(config)


def inversion_config(config: ml_collections.ConfigDict) -> inversion.InversionConfig:
  """The round's textual inversion as stereo.py:110-261 runs it: one token, batch 1, no accumulation, AdamW
  (torch defaults: wd 1e-2) at ti_lr (scale_lr x 1), constant; flips 0.5 (dataset.py flip_p); noise at
  t in [0, 999) (:219), one step short of CCE's range."""
  s = config.stereo
  return inversion.InversionConfig(
    protocol="cce", placement="word", words=tuple(config.concept.prompts), steps=s.ti_steps, lr=s.ti_lr, batch=1,
    max_images=s.max_images, tokens=1, initializer=s.initializer, templates=s.templates, accumulation=1,
    scale_lr=True, weight_decay=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, flip_p=0.5, budgets=(), scheduler="ddim",
    sample_steps=50, latents="jax", learned="", train_timesteps=999,
  )  # fmt: skip


def stratified(items: list, n: int, rng: np.random.Generator) -> list:
  """stereo.py:376-386: each item n // len times, shuffled, the remainder drawn without replacement."""
  out = list(items) * (n // len(items))
  rng.shuffle(out)
  rest = n - len(out)
  if rest > 0:
    out += [items[j] for j in rng.choice(len(items), rest, replace=False)]
  return out


# ---------------------------------------------------------------------------------------------- encoding


class Encoder:
  """[77, D] encodings by the original text encoder (STEREO never trains it) of prompts and of learned tokens
  standing alone (`token_xxxx` as a prompt: BOS, the token's row, EOS, padding)."""

  def __init__(self, pipe, tokenizer):
    self.pipe, self.tokenizer = pipe, tokenizer
    self.text = CLIPTextModel(pipe.text_config)

  def _encode(self, ids: np.ndarray, which: np.ndarray, rows: np.ndarray) -> jax.Array:
    words = self.text.apply({"params": self.pipe.text_params}, jnp.asarray(ids)[None], method="word_embeddings")
    seq = inversion.place(words, jnp.asarray(which)[None], jnp.asarray(rows))
    return inversion.encode_placed(TextSide.of(self.pipe), self.pipe.text_params, seq, jnp.asarray(ids)[None])[0]

  def prompt(self, text: str) -> jax.Array:
    ids = tok_lib.tokenize(self.tokenizer, [text])[0]
    d = self.pipe.text_params["embeddings"]["token_embedding"]["embedding"].shape[-1]
    return self._encode(ids, np.full_like(ids, -1), np.zeros((1, d), np.float32))

  def token(self, row: np.ndarray) -> jax.Array:
    ids, which = inversion.slotted_ids(self.tokenizer, ["", ""], 1)
    return self._encode(ids, which, np.asarray(row, np.float32)[None])


# ---------------------------------------------------------------------------------------------- state


def _state_path(workdir: str) -> str:
  return os.path.join(workdir, "stereo", STATE)


def read_state(workdir: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What is done: {"rounds_done": r, "reo_done": bool}; refused (ConfigError) if written under another config."""
  path = _state_path(workdir)
  if not os.path.exists(path):
    return {"rounds_done": 0, "reo_done": False}
  with open(path) as f:
    state = json.load(f)
  if state["config"] != json.loads(json.dumps(checkpoint.config_dict(config))):
    raise ConfigError(
      f"--workdir={workdir} holds a STEREO run under another config ({path}); give a new workdir or that config"
    )
  return state


def write_state(workdir: str, config: ml_collections.ConfigDict, rounds_done: int, reo_done: bool) -> None:
  """Atomically (a temporary file renamed over the old one): an interrupted write leaves the previous state."""
  path = _state_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  state = {"rounds_done": rounds_done, "reo_done": reo_done, "config": checkpoint.config_dict(config)}
  with open(path + ".tmp", "w") as f:
    json.dump(state, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(path + ".tmp", path)


def _save_npz(path: str, arrays: dict[str, Any]) -> None:
  with open(path + ".tmp", "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
  os.replace(path + ".tmp", path)


def _round_dir(workdir: str, r: int) -> str:
  return os.path.join(workdir, "stereo", f"round_{r}")


def load_round(workdir: str, r: int) -> tuple[dict, np.ndarray]:
  """Round r's erased UNet leaves (flat) and its learned token [D]."""
  with np.load(os.path.join(_round_dir(workdir, r), "unet.npz")) as data:
    params = {k: jnp.asarray(data[k]) for k in data.files}
  with np.load(os.path.join(_round_dir(workdir, r), "token.npz")) as data:
    token = np.asarray(data["token"])
  return params, token


class StageClock:
  """A stage's wall seconds and its first step's (which compiles, when the program is new to the process)."""

  def __init__(self, name: str, steps: int):
    self.name, self.steps, self.t0, self.first, self.seconds = name, steps, time.perf_counter(), None, None

  def step(self, i: int, metrics: dict) -> None:
    """erase's log callback: waits for step 0 to finish (dispatch is asynchronous) to time it."""
    if i == 0:
      jax.block_until_ready(metrics)
      self.first = time.perf_counter() - self.t0

  def stop(self, result: Any) -> None:
    jax.block_until_ready(result)
    self.seconds = time.perf_counter() - self.t0

  def record(self, workdir: str) -> None:
    """After the stage's state is written: a stage recorded is never run again, one in progress never recorded."""
    line = {"stage": self.name, "steps": self.steps, "seconds": self.seconds, "first_step_seconds": self.first}
    with open(os.path.join(workdir, "stereo", TIMING), "a") as f:
      f.write(json.dumps(line) + "\n")


def steady_seconds(workdir: str, config: ml_collections.ConfigDict) -> float:
  """The run's training seconds without compilation: per stage, the mean seconds of its steps after the first,
  times its steps (a one-step stage counts whole). Raises if a stage of a finished run has no record."""
  with open(os.path.join(workdir, "stereo", TIMING)) as f:
    records = {r["stage"]: r for r in map(json.loads, f)}
  expected = [f"{k}_{r}" for r in range(config.stereo.rounds) for k in ("ste_erase", "ste_inversion")] + ["reo"]
  missing = [name for name in expected if name not in records]
  if missing:
    raise ValueError(f"{workdir}/stereo/{TIMING} has no record of {missing}")
  total = 0.0
  for r in map(records.get, expected):
    rest = r["seconds"] - r["first_step_seconds"]
    total += rest / (r["steps"] - 1) * r["steps"] if r["steps"] > 1 else r["seconds"]
  return total


# ---------------------------------------------------------------------------------------------- stages


def erase(cfg: stereo.EraseConfig, unet, params: dict, rest: dict, original, schedule, key, alphas, log=None) -> dict:
  """`len(schedule)` steps of stereo.erase_step from `params` with a fresh AdamW (each train_erasing and
  robustly_erase_once builds its own optimizer); schedule[i] is step i's conditions."""
  opt_state = stereo.optimizer(cfg).init(params)
  params = jax.tree.map(jnp.copy, params)  # donated by the step
  for i, conds in enumerate(schedule):
    params, opt_state, metrics = stereo.erase_step(
      cfg, unet, params, opt_state, rest, original, conds, alphas, jax.random.fold_in(key, i)
    )
    if log is not None:
      log(i, metrics)
  return params


def erase_config(config: ml_collections.ConfigDict, pipe, stage: str) -> stereo.EraseConfig:
  s = config.stereo
  hw = generation.image_size(pipe) // 8 if pipe.vae_config is not None else pipe.unet_config.sample_size
  return stereo.EraseConfig(
    stage=stage,
    lr=s.ste_lr if stage == "ste" else s.reo_lr,
    weight_decay=s.weight_decay,
    guidance=s.negative_guidance if stage == "ste" else s.compositional_guidance,
    start_guidance=s.start_guidance,
    sample_steps=s.sample_steps,
    latent_shape=(hw, hw, pipe.unet_config.in_channels),
  )


def run(config: ml_collections.ConfigDict, workdir: str, show_progress: bool = True) -> dict[str, Any]:
  """Both stages, resumable; returns the run's summary (the exported unet and pipeline, the learned tokens'
  nearest words, the stages' last losses)."""
  anchors = validate(config)
  s = config.stereo
  os.makedirs(workdir, exist_ok=True)
  say = print if show_progress else (lambda *a, **k: None)
  with workdir_lock.WorkdirLock(workdir):
    state = read_state(workdir, config)
    pipe = sd_convert.load_pipeline(sd_convert.resolve_pretrained(config.model.pretrained), with_vae=True)
    tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
    unet = UNet2DConditionModel(pipe.unet_config)
    alphas = jnp.asarray(pipe.schedule.alphas_cumprod_diffusers(), jnp.float32)
    encoder = Encoder(pipe, tokenizer)
    uncond = encoder.prompt("")
    concepts = [encoder.prompt(p) for p in config.concept.prompts]
    mask = trainable.unet_mask(pipe.unet_params, s.method)
    original_params, rest = trainable.split(pipe.unet_params, mask)
    key = jax.random.key(s.seed)  # stereo.py:19-22: every stage starts from seed 42 again
    losses = {}

    # ------------------------------------------------------------------------------------- stage 1: STE
    tokens, params = [], original_params
    for r in range(state["rounds_done"]):
      params, token = load_round(workdir, r)
      tokens.append(token)
    if state["rounds_done"] and state["rounds_done"] < s.rounds:
      say(f"STEREO: resuming STE after round {state['rounds_done'] - 1}")
    images = None
    ste_cfg = erase_config(config, pipe, "ste")
    for r in range(state["rounds_done"], s.rounds):
      if images is None:
        size = generation.image_size(pipe)
        source, key_name = s.images, "stereo.images"
        images = inversion.concept_images(source, s.max_images, size, seed=s.seed, center_crop=False, key=key_name)
      # round 0: the concept's prompts, drawn uniformly (stereo.py:35-51); later: the previous token alone
      erased = concepts if r == 0 else [encoder.token(tokens[-1])]
      rng = np.random.default_rng(s.seed)
      picks = rng.integers(0, len(erased), s.iterations)
      schedule = [{"uncond": uncond, "erase": erased[j]} for j in picks]
      erase_clock = StageClock(f"ste_erase_{r}", s.iterations)
      params = erase(ste_cfg, unet, params, rest, pipe.unet_params, schedule, key, alphas, log=erase_clock.step)
      erase_clock.stop(params)
      # dataset.py: round r trains on images [r * N // R, (r + 1) * N // R)
      per = max(1, len(images) // s.rounds)
      start = (r * per) % len(images)
      share = np.concatenate([images, images])[start : start + per]
      attacked = pipe._replace(unet_params=trainable.merge(params, rest))
      ti_clock = StageClock(f"ste_inversion_{r}", s.ti_steps)
      embeds, advance = inversion.trainer(attacked, tokenizer, None, share, inversion_config(config), s.seed)
      embeds, loss = advance(embeds, 0, 1)  # the first step alone, timed: it compiles
      ti_clock.step(0, embeds)
      if s.ti_steps > 1:
        embeds, loss = advance(embeds, 1, s.ti_steps)
      ti_clock.stop(embeds)
      token = np.asarray(embeds[0])
      tokens.append(token)
      os.makedirs(_round_dir(workdir, r), exist_ok=True)
      _save_npz(os.path.join(_round_dir(workdir, r), "unet.npz"), params)
      _save_npz(os.path.join(_round_dir(workdir, r), "token.npz"), {"token": token})
      write_state(workdir, config, r + 1, False)
      erase_clock.record(workdir)
      ti_clock.record(workdir)
      losses[f"ti_round_{r}"] = float(loss)
      say(f"STEREO round {r}: token learned (denoising loss {float(loss):.4f})")

    # ------------------------------------------------------------------------------------- stage 2: REO
    outputs_dir = workdir
    if not state["reo_done"]:
      negatives = [*concepts, *(encoder.token(t) for t in tokens[: s.adv_concepts])]
      rng = np.random.default_rng(s.seed)
      anchor_idx = stratified(list(range(len(anchors))), s.iterations, rng)
      erase_idx = stratified(list(range(len(negatives))), s.iterations, rng)
      encoded_anchors = {j: encoder.prompt(anchors[j]) for j in set(anchor_idx)}
      stacked = jnp.stack(negatives)
      schedule = [
        {"uncond": uncond, "erase": negatives[e], "negatives": stacked, "anchor": encoded_anchors[a]}
        for e, a in zip(erase_idx, anchor_idx)
      ]
      last, clock = {}, StageClock("reo", s.iterations)
      params = erase(
        erase_config(config, pipe, "reo"), unet, original_params, rest, pipe.unet_params, schedule, key, alphas,
        log=lambda i, m: (clock.step(i, m), last.update(loss=m["loss"])),
      )  # fmt: skip
      clock.stop(params)
      losses["reo_last"] = float(last["loss"])
      run_exports.write(outputs_dir, pipe, "unet", trainable.merge(params, rest))
      write_state(workdir, config, s.rounds, True)
      clock.record(workdir)
    table = pipe.text_params["embeddings"]["token_embedding"]["embedding"]
    learned = [inversion.nearest_words(tokenizer, t[None], np.asarray(table)) for t in tokens]
  return {
    "workdir": workdir,
    "unet": os.path.join(outputs_dir, "unet"),
    "pipeline": os.path.join(outputs_dir, "pipeline"),
    "tokens_nearest": learned,
    "losses": losses,
  }

"""One AdvUnlearn outer iteration, jitted (spec 2.3-2.4), in named stages a reader can follow top to bottom:

  1. `draw_points`: the iteration's training points, (t_enc, t_ddpm, start noise) for every attack step, the
     defender's concept batch and its retain batch, from the same keys whatever the x_t source;
  2. `roll_out`: their x_t, all in one batched pass (`online`), one partial DDIM after another as the reference
     runs them (`online_sequential`), or read from the trajectory bank (`bank`);
  3. `frozen_predictions`: the original model's noise at every point (e_p for the attack, e_0 and e_p for the ESD
     target, the retain targets), in one UNet call;
  4. `attack` (after warm-up) on its points;
  5. `defender_update`, then in retain mode `iter` the extra `retain.steps`; the bank, if it renews, last.

No x_t depends on the adversarial prompt or on the parameters the iteration updates (the attack's and the
defender's points come from the frozen UNet, or for UNet methods from the UNet as the iteration starts), which
is what lets stage 2 roll every point out at once. The reference interleaves each attack step's rollout with
its gradient step; drawing the points first gives the same points from the same keys.

`train_step(cfg, models, state, frozen, batch, with_attack, new_prompt)` is pure. `state` (trainable leaves, Adam
state, the latest adversarial sequence, the bank) is donated; `frozen` (the original UNet and CLIP, the prompts' frozen
encodings and layouts) never is. Per-iteration randomness is `fold_in(root_key, step)`, so a resumed run
repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from advunlearn_jax import sharding
from advunlearn_jax.data.tokenizer import EOT_ID
from advunlearn_jax.diffusion import ddim, sdxl_conditioning
from advunlearn_jax.diffusion.sampling import cfg_eps
from advunlearn_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from advunlearn_jax.models.unet import UNet2DConditionModel, apply_conditioned
from advunlearn_jax.sharding import constrain_batch
from advunlearn_jax.unlearn import attack as attack_lib
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import cond_tree, prompts, timesteps, trainable
from advunlearn_jax.unlearn import retain as retain_lib


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static about a step (hashable: part of the jit cache key), as wiring.step_config builds it from a
  run config and the models (no defaults here: config_lib's are the only ones)."""

  lr: float
  negative_guidance: float
  start_guidance: float
  concept_batch: int
  retain: retain_lib.RetainConfig
  attack: attack_lib.AttackConfig
  num_tokens: int  # k; for `add`, the longest concept's token count
  latent_hw: int
  latent_channels: int
  xt_source: str  # bank.SOURCES
  rollout_buckets: int  # online: batch widths of the batched rollout (ddim.bucket_widths)
  rollout_rows_per_call: int  # online: > 0 that many slots of continuous batching instead of buckets
  bank: bank_lib.BankConfig


class Frozen(NamedTuple):
  """SDXL: `clip` is {"text_encoder": tower 1, "text_encoder_2": tower 2}, the ids are tokenizer 1's (EOT padding:
  tower 2's "!" padding is put in by `_encode`), and the embeddings are `SDXLCond`s (see SDXLText)."""

  unet: Any  # U_o: also U_theta's non-trained leaves
  clip: Any  # E_o: also E_theta's non-trained leaves
  emb_uncond: Any  # [77, D] E_o(""); SDXL: the pipeline's unconditional branch (zeros where it forces them)
  concept_ids: jax.Array  # [C, 77]
  concept_emb: Any  # [C, 77, D] E_o(c)
  word_index: jax.Array  # [C, 77] layout maps
  delta_index: jax.Array  # [C, 77]
  retain_ids: jax.Array  # [N, 77]
  retain_emb: Any  # [N, 77, D] E_o(c_r)
  tables: ddim.DDIMTables
  # attack.objective inversion/both: the concept's images as scaled VAE latents [M, h, w, c], and the training
  # schedule's alphas_cumprod [T] that noises them; None: the reference's objective alone.
  concept_latents: jax.Array | None = None
  alphas_cumprod: jax.Array | None = None


class TrainState(NamedTuple):
  step: jax.Array
  params: dict  # flat {path: leaf}: the trained leaves only
  opt_state: Any
  # [77, D] the latest adversarial sequence (the defender's between updates); SDXL: one per tower, a pair.
  last_sequence: Any
  has_last: jax.Array  # bool
  # [k, D] the adversarial rows that built last_sequence: `latest` init carries them to the next round, whichever
  # concept prompt (and so which layout) that round draws. SDXL: a pair.
  last_delta: Any
  # The first iteration (1-based, as the step count after it) at which a loss term was not finite, 0 while none
  # was, and the LOSS_TERMS then: carried on the device, so the loop reads it only before it writes a checkpoint
  # or an export, never once per step.
  diverged_at: jax.Array  # int32
  diverged_losses: jax.Array  # [len(LOSS_TERMS)] float32
  bank: bank_lib.Bank | None = None  # xt_source='bank': the trajectories (renewed in place when configured)


class Batch(NamedTuple):
  retain_idx: jax.Array  # [retain.batch] int32, drawn on the host without replacement per epoch
  key: jax.Array  # the iteration's key: fold_in(root_key, step)
  # The key of the iteration that drew the current concept (attack.update_every > 1: the latest update's);
  # None: this iteration's.
  prompt_key: jax.Array | None = None
  # retain mode iter: [retain.steps, retain.batch] each extra step's prompts; None: `retain_idx` for every step.
  iter_retain_idx: jax.Array | None = None
  # attack.restart_every > 0: whether this round's attack starts from random rows again (a bool); None: never.
  restart: jax.Array | None = None


class SDXLText(NamedTuple):
  """What the step needs to condition an SDXL UNet beyond tower 1 (hashable: part of Models).

  One adversarial prompt, two embedding spaces: the attacker's k soft tokens sit at the layout's positions in
  both towers, one row per tower per token (a [k, 768] and a [k, 1280] delta for SDXL base), optimised jointly on
  the one attack loss, from the same random token ids. Why: a text-prompt attacker of SDXL types one prompt, and
  the pipeline feeds the same token positions (the two tokenizers share their vocabulary and BPE, only the padding
  differs) to both towers; the soft relaxation of a token is its row in each table. Attacking one tower alone
  would leave the other tower's half of the context and the pooled embedding clean, a weaker attacker than the
  discrete one it stands for, and a defender trained against it would not be robust to the real one.

  Tower 2 reads the same sequence as tower 1 up to the sequence's first EOT and tokenizer 2's pad row ("!" for
  SDXL base) after it, as the pipeline's ids do; its pooled output (text_embeds) is taken at that EOT."""

  tower_2: CLIPTextModelWithProjection
  time_ids: tuple[float, ...]  # the micro-conditioning row of every image (sdxl_conditioning.time_ids)
  pad_id_2: int  # tokenizer 2's padding id


class Models(NamedTuple):
  clip: CLIPTextModel
  unet: UNet2DConditionModel
  trained: trainable.Trained  # which tower, which leaves
  mask: frozenset  # the trained tower's selected leaves (trainable.selected_paths)
  mesh: Mesh | None = None  # batches split over its `data` axis
  sdxl: SDXLText | None = None  # an SDXL pipeline: its second tower and micro-conditioning


class Points(NamedTuple):
  """Training points, one row each. A group's rows either each have their own t (the attack's, one per step)
  or share one (the defender's concept and retain rows, spec 8.11)."""

  t_enc: jax.Array  # [n] int32
  t_ddpm: jax.Array  # [n] int32
  noise: jax.Array  # [n, h, w, c] start codes (online sources)
  trajectory: jax.Array  # [n] int32 which bank trajectory (bank source)
  prompt: jax.Array  # [n] int32 the concept index, or the retain prompt's index


class IterationPoints(NamedTuple):
  attack: Points  # [attack steps] rows; empty during warm-up
  concept: Points  # [concept_batch]
  retain: Points  # [retain.batch]


KEY_NAMES = ("concept", "attack", "init", "t", "noise_c", "noise_r", "iter")
# The inversion objective's draws come from keys['attack'] folded with this, not from a new name in KEY_NAMES,
# which would move every other key (and every run measured so far).
INVERSION_STREAM = 2**31 - 1
# The defender's loss terms, whose finiteness the state carries (TrainState.diverged_at). The attack's loss needs
# no check of its own: a non-finite adversarial prompt makes the defender's loss non-finite in the same step.
LOSS_TERMS = ("loss", "loss_unlearn", "loss_retain")


def optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  return optax.adam(cfg.lr, b1=0.9, b2=0.999, eps=1e-8)


def init_state(cfg: StepConfig, models: Models, frozen: Frozen, bank: bank_lib.Bank | None = None) -> TrainState:
  # Copies: the state is donated to every step, and must never alias the frozen originals.
  params = jax.tree.map(jnp.copy, _trained_leaves(cfg, models, frozen))
  rows = lambda n: jax.tree.map(lambda table: jnp.zeros((n, table.shape[-1])), _token_table(models, frozen))
  return TrainState(
    jnp.zeros((), jnp.int32),
    params,
    optimizer(cfg).init(params),
    rows(77),
    jnp.zeros((), bool),
    rows(cfg.num_tokens),
    *finite_so_far(),
    bank,
  )


def finite_so_far() -> tuple[jax.Array, jax.Array]:
  """(diverged_at, diverged_losses) of a state in which every loss term so far was finite."""
  return jnp.zeros((), jnp.int32), jnp.zeros((len(LOSS_TERMS),), jnp.float32)


def _track_divergence(state: TrainState, metrics: dict) -> TrainState:
  """Records the first iteration whose loss terms are not all finite (state.step is still the iteration's index)."""
  terms = jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in LOSS_TERMS])
  first = (state.diverged_at == 0) & ~jnp.all(jnp.isfinite(terms))
  return state._replace(
    diverged_at=jnp.where(first, state.step + 1, state.diverged_at),
    diverged_losses=jnp.where(first, terms, state.diverged_losses),
  )


def _trained_leaves(cfg, models, frozen):
  return trainable.split(models.trained.of(frozen.clip, frozen.unet), models.mask)[0]


def student_params(cfg: StepConfig, models: Models, frozen: Frozen, params: dict) -> tuple[Any, Any]:
  """(E_theta params, U_theta params): the trained leaves merged into the frozen originals."""
  tower = models.trained.of(frozen.clip, frozen.unet)
  merged = trainable.merge(params, trainable.split(tower, models.mask)[1])
  return models.trained.replace(merged, frozen.clip, frozen.unet)


def _broadcast_batch(context: Any, n: int) -> Any:
  """[77, D] -> [n, 77, D] (each of SDXL's pair)."""
  return cond_tree.broadcast(context, n)


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)


def esd_target(e_0: jax.Array, e_p: jax.Array, eta: float) -> jax.Array:
  """e_0 - eta * (e_p - e_0): away from the concept (spec 2.3; 2 e_0 - e_p for eta = 1)."""
  return e_0 - eta * (e_p - e_0)


def _unet(models: Models):
  """U(params, x, t, cond), its batch split over the mesh; cond a context array or an SDXLCond."""
  return lambda p, x, t, ctx: apply_conditioned(models.unet, p, constrain_batch(x, models.mesh), t, ctx)


def _encode(models: Models):
  """E(params, word embeddings [B, 77, D], eot [B]) -> the UNet's conditioning. SD: the last hidden state (`eot`
  unused). SDXL (SDXLText): words are a pair (tower 1's, tower 2's) of the same EOT-padded ids, `eot` is each row's
  first EOT position; the conditioning is what sdxl_conditioning.encode_ids makes of the pipeline's ids."""
  if models.sdxl is None:
    return lambda p, embeds, eot=None: models.clip.apply({"params": p}, inputs_embeds=embeds).last_hidden_state
  sdxl = models.sdxl

  def encode(p, embeds, eot):
    tower, tower_2 = models.clip, sdxl.tower_2
    return sdxl_conditioning.encode_words(
      tower, tower_2, p["text_encoder"], p["text_encoder_2"], *embeds, eot, sdxl.pad_id_2, sdxl.time_ids
    )

  return encode


def _token_table(models: Models, frozen: Frozen) -> Any:
  """[V, D] CLIP's token embeddings: word embeddings are one_hot(ids) @ this table (never trained). SDXL: the pair
  of both towers' tables."""
  if models.sdxl is None:
    return frozen.clip["embeddings"]["token_embedding"]["embedding"]
  return (
    frozen.clip["text_encoder"]["embeddings"]["token_embedding"]["embedding"],
    frozen.clip["text_encoder_2"]["text_model"]["embeddings"]["token_embedding"]["embedding"],
  )


def _words(models: Models, frozen: Frozen, ids: jax.Array) -> Any:
  """Word embeddings of token ids: [..., 77, D], SDXL a pair."""
  return jax.tree.map(lambda table: table[ids], _token_table(models, frozen))


def _plain_eot(ids: jax.Array) -> jax.Array:
  """The first EOT position of each row of token ids [..., 77]."""
  return jnp.argmax(ids == EOT_ID, axis=-1)


def _layout_eot(ids: jax.Array, word_index: jax.Array, delta_index: jax.Array) -> jax.Array:
  """The first position of a laid-out adversarial sequence that copies an EOT row of the clean ids: where the
  typed prompt's EOT stands (prefix_k moves it k places on)."""
  copies_eot = (word_index >= 0) & (delta_index < 0) & (ids[jnp.maximum(word_index, 0)] == EOT_ID)
  return jnp.argmax(copies_eot)


def iteration_keys(key: jax.Array) -> dict[str, jax.Array]:
  return dict(zip(KEY_NAMES, jax.random.split(key, len(KEY_NAMES))))


# ---------------------------------------------------------------------------------------------- 1. draw points


def _rows(cfg: StepConfig, key: jax.Array, t: timesteps.Timesteps, prompt: jax.Array, trajectories: int) -> Points:
  """Points for `prompt`'s rows at one (t_enc, t_ddpm), their start codes and bank trajectories from `key`."""
  n = prompt.shape[0]
  return Points(
    jnp.broadcast_to(t.t_enc, (n,)),
    jnp.broadcast_to(t.t_ddpm, (n,)),
    jax.random.normal(key, (n, cfg.latent_hw, cfg.latent_hw, cfg.latent_channels)),
    jax.random.randint(key, (n,), 0, trajectories),
    prompt.astype(jnp.int32),
  )


def _fresh_t_rows(cfg: StepConfig, frozen: Frozen, key: jax.Array, prompt: jax.Array) -> Points:
  k_t, k_x = jax.random.split(key)
  t = timesteps.draw_timesteps(k_t, ddim_steps=frozen.tables.timesteps.shape[0])
  return _rows(cfg, k_x, t, prompt, cfg.bank.concept_trajectories)


def draw_points(
  cfg: StepConfig, frozen: Frozen, keys: dict, c: jax.Array, retain_idx: jax.Array, attacking: bool
) -> IterationPoints:
  """Attack step i draws from fold_in(keys['attack'], i), as its loss did when it rolled out inside the attack;
  the defender's concept rows from keys['t'] and its retain rows, at the same t, from keys['noise_r'] (none
  unless the defender's loss has a retain term)."""
  steps = cfg.attack.steps if attacking else 0
  if not uses_retain_term(cfg):
    retain_idx = retain_idx[:0]
  one = lambda i: _fresh_t_rows(cfg, frozen, jax.random.fold_in(keys["attack"], i), c[None])
  attack = jax.tree.map(lambda a: a[:, 0], jax.vmap(one)(jnp.arange(steps)))
  concept = _fresh_t_rows(cfg, frozen, keys["t"], jnp.broadcast_to(c, (cfg.concept_batch,)))
  shared_t = timesteps.Timesteps(concept.t_enc[0], concept.t_ddpm[0])
  retain = _rows(cfg, keys["noise_r"], shared_t, retain_idx, cfg.bank.retain_trajectories)
  return IterationPoints(attack, concept, retain)


def _concat(groups: list[Points]) -> Points:
  return jax.tree.map(lambda *a: jnp.concatenate(a), *groups)


def _split(flat: jax.Array, groups: list[Points]) -> list[jax.Array]:
  sizes = [g.t_enc.shape[0] for g in groups]
  return [flat[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]


# ---------------------------------------------------------------------------------------------- 2. roll out


def _conditions(frozen: Frozen, points: IterationPoints) -> list[Any]:
  """The frozen encoder's embedding each group's rollout (and its target) is conditioned on."""
  return [
    cond_tree.take(frozen.concept_emb, points.attack.prompt),
    cond_tree.take(frozen.concept_emb, points.concept.prompt),
    cond_tree.take(frozen.retain_emb, points.retain.prompt),
  ]


def roll_out(
  cfg: StepConfig, models: Models, frozen: Frozen, unet_params: Any, bank: bank_lib.Bank | None, points
) -> tuple[list[jax.Array], ddim.RolloutStats]:
  """x_t of every group of `points` ([attack, concept, retain]), by the reference's partial DDIM with CFG from
  the given UNet (or from the bank), and what the rollout cost."""
  groups = list(points)
  conds = _conditions(frozen, points)
  zero = jnp.zeros((), jnp.int32)
  if cfg.xt_source == "bank":
    out = [
      bank_lib.concept_latents(bank, points.attack.prompt, points.attack.trajectory, points.attack.t_enc),
      bank_lib.concept_latents(bank, points.concept.prompt, points.concept.trajectory, points.concept.t_enc),
      bank_lib.retain_latents(bank, points.retain.prompt, points.retain.trajectory, points.retain.t_enc),
    ]
    return [constrain_batch(x, models.mesh) for x in out], ddim.RolloutStats(zero, zero, zero)
  unet = _unet(models)
  uncond = frozen.emb_uncond

  def eps_fn(x, t, cond):
    u = cond_tree.broadcast_like(uncond, cond)
    return cfg_eps(lambda a, b, ctx: unet(unet_params, a, b, ctx), x, t, cond, u, cfg.start_guidance)

  if cfg.xt_source == "online":
    flat = _concat(groups)
    rows = flat.t_enc.shape[0]
    multiple = models.mesh.shape[sharding.DATA] if models.mesh is not None else 1
    # Without attack rows every row walks to the defender's one t_enc: a single bucket wastes nothing.
    walks_differ = points.attack.t_enc.shape[0] > 0
    widths = ddim.bucket_widths(rows, cfg.rollout_buckets if walks_differ else 1, multiple)
    slots = -(-cfg.rollout_rows_per_call // multiple) * multiple if walks_differ else 0  # each device as many
    x, stats = ddim.partial_ddim_batched(
      eps_fn, flat.noise, flat.t_enc, cond_tree.concat(conds), frozen.tables, widths, slots
    )
    return _split(jax.lax.stop_gradient(x), groups), stats
  # online_sequential: the reference's shape, one rollout per attack step, then the concept and retain batches.
  out, stats = [], ddim.RolloutStats(zero, zero, zero)
  for i, (group, cond) in enumerate(zip(groups, conds)):
    x, s = _sequential(eps_fn, group, cond, frozen.tables, per_row=i == 0)
    out.append(x)
    stats = jax.tree.map(jnp.add, stats, s)
  return out, stats


def _sequential(eps_fn, group: Points, cond, tables, per_row: bool):
  n = group.t_enc.shape[0]
  if n == 0:
    zero = jnp.zeros((), jnp.int32)
    return group.noise, ddim.RolloutStats(zero, zero, zero)
  steps = ddim.num_unet_steps(group.t_enc, tables.timesteps.shape[0])
  rollout = lambda x, t_enc, c: jax.lax.stop_gradient(ddim.partial_ddim(lambda a, t: eps_fn(a, t, c), x, t_enc, tables))
  if not per_row:  # one batch at its shared t
    return rollout(group.noise, group.t_enc[0], cond), ddim.RolloutStats(steps[0], steps[0] * n, jnp.sum(steps))
  one = lambda a: rollout(a[0][None], a[1], cond_tree.broadcast(a[2], 1))[0]
  x = jax.lax.map(one, (group.noise, group.t_enc, cond))
  return x, ddim.RolloutStats(jnp.sum(steps), jnp.sum(steps), jnp.sum(steps))


# ---------------------------------------------------------------------------------------------- 3. frozen predictions


class Targets(NamedTuple):
  attack_e_p: jax.Array  # [A, h, w, c] E_o(c)'s noise at each attack point
  esd: jax.Array  # [Bc, ...] e_0 - eta (e_p - e_0)
  retain: jax.Array  # [Br, ...] r_p


def frozen_predictions(cfg: StepConfig, models: Models, frozen: Frozen, points, xs) -> Targets:
  """Every frozen prediction of the iteration in one UNet call: the attack's e_p, the defender's e_0 and e_p,
  the retain targets. Always the original UNet U_o, never the one being trained (spec 2.3)."""
  conds = _conditions(frozen, points)
  x_c, n_c = xs[1], xs[1].shape[0]
  uncond = cond_tree.broadcast(frozen.emb_uncond, n_c)
  x = jnp.concatenate([*xs, x_c])
  t = jnp.concatenate([points.attack.t_ddpm, points.concept.t_ddpm, points.retain.t_ddpm, points.concept.t_ddpm])
  eps = jax.lax.stop_gradient(_unet(models)(frozen.unet, x, t, cond_tree.concat([*conds, uncond])))
  e_attack, e_p, r_p, e_0 = _split(eps, [*points, points.concept])
  return Targets(e_attack, esd_target(e_0, e_p, cfg.negative_guidance), r_p)


# ---------------------------------------------------------------------------------------------- 4. attack


def _initial_delta(cfg, models, state, frozen, keys, c, text_p, restart) -> jax.Array:
  """delta's start: k random vocabulary rows (their conditioning rows for condition_embd), or with `latest` the
  previous round's adversarial rows once there is one, unless this round `restart`s (attack.restart_every)."""
  encode = _encode(models)
  token_table = _token_table(models, frozen)
  k = cfg.num_tokens
  if cfg.attack.embedding == "condition_embd":  # the conditioning rows of k random tokens after SOT (SD only)
    ids = jax.random.randint(keys["init"], (k,), 0, token_table.shape[0])
    rand_ids = jnp.concatenate([frozen.concept_ids[c][:1], ids, jnp.full((77 - 1 - k,), frozen.concept_ids[c][-1])])
    random_init = encode(text_p, token_table[rand_ids][None])[0, 1 : 1 + k]
  else:
    # SDXL: the same key draws the same token ids in both towers' tables (one typed prompt, spec'd in SDXLText).
    random_init = jax.tree.map(lambda table: attack_lib.random_rows(keys["init"], table, k), token_table)
  if cfg.attack.init != "latest":
    return random_init
  if cfg.attack.latest_init_quirk:
    latest = jax.tree.map(lambda seq: prompts.initial_rows_from_sequence(seq, k), state.last_sequence)
  else:
    latest = state.last_delta
  carry = state.has_last if restart is None else state.has_last & ~restart
  return jax.tree.map(lambda a, b: jnp.where(carry, a, b), latest, random_init)


class InversionPoints(NamedTuple):
  """One row per attack step: textual inversion's noised image of the concept, its t and its noise (the target)."""

  x_t: jax.Array  # [steps, h, w, c]
  t: jax.Array  # [steps] int32, uniform over the training schedule
  noise: jax.Array  # [steps, h, w, c]


def inversion_points(cfg: StepConfig, frozen: Frozen, keys: dict) -> InversionPoints:
  """Step i's image (uniform over the concept's), t and noise, from fold_in(keys['attack'], INVERSION_STREAM): as
  CCE's loss draws them (esd/concept_inversion.py:951-980), one image per step."""
  k_image, k_t, k_noise = jax.random.split(jax.random.fold_in(keys["attack"], INVERSION_STREAM), 3)
  steps, latents, alphas = cfg.attack.steps, frozen.concept_latents, frozen.alphas_cumprod
  x_0 = latents[jax.random.randint(k_image, (steps,), 0, latents.shape[0])]
  t = jax.random.randint(k_t, (steps,), 0, alphas.shape[0])
  noise = jax.random.normal(k_noise, x_0.shape)
  a = alphas[t][:, None, None, None]
  return InversionPoints(jnp.sqrt(a) * x_0 + jnp.sqrt(1 - a) * noise, t, noise)


def attack(
  cfg: StepConfig,
  models: Models,
  state: TrainState,
  frozen: Frozen,
  keys: dict,
  c,
  text_theta,
  unet_theta,
  point,
  restart: jax.Array | None = None,
) -> attack_lib.AttackResult:
  """The adversarial sequence against the current student (frozen during the attack). Step i sees `point`'s
  i-th (x_t, t_ddpm, e_p)."""
  encode, unet = _encode(models), _unet(models)
  text_p, unet_p = jax.lax.stop_gradient((text_theta, unet_theta))
  words_c = _words(models, frozen, frozen.concept_ids[c])
  layout = (frozen.word_index[c], frozen.delta_index[c])
  eot = _layout_eot(frozen.concept_ids[c], *layout)[None]
  # word_embd: delta lives among the word embeddings, before CLIP. condition_embd: delta rows are placed into the
  # encoder's output (the UNet conditioning) of the clean prompt; the reference builds that tensor once and never
  # rebuilds it (spec 3.3), here it follows the current encoder, so the defender still trains through the clean rows.
  in_condition = cfg.attack.embedding == "condition_embd"
  base = encode(text_p, words_c[None])[0] if in_condition else words_c
  delta0 = _initial_delta(cfg, models, state, frozen, keys, c, text_p, restart)

  objective = cfg.attack.objective
  if objective != "esd":
    point = (*point, inversion_points(cfg, frozen, keys))

  def loss(seq, p):
    cond = seq[None] if in_condition else encode(text_p, cond_tree.broadcast(seq, 1), eot)
    rows = []  # (x_t, t, target) of each term, through one UNet call
    if objective != "inversion":  # the reference's: the original's noise on the concept at x_t it rolled out
      rows.append(p[:3])
    if objective != "esd":  # CCE's: the noise that made the concept's image x_t
      rows.append(tuple(p[3]))
    x_t, t, target = (jnp.stack(parts) for parts in zip(*rows))
    eps = unet(unet_p, x_t, t, cond_tree.broadcast(cond_tree.take(cond, 0), len(rows)))
    return sum(mse(eps[i], target[i]) for i in range(len(rows)))

  return attack_lib.run(cfg.attack, delta0, base, *layout, loss, point)


def condition_delta(cfg: StepConfig, models: Models, frozen: Frozen, c, text_theta, sequence) -> jax.Array:
  """condition_embd: the adversarial rows of a conditioning `sequence`, which the defender places onto its own
  encoding of the clean prompt (exact for every layout but `add`, whose rows are taken against the current
  encoding)."""
  words_c = _words(models, frozen, frozen.concept_ids[c])
  base = _encode(models)(jax.lax.stop_gradient(text_theta), words_c[None])[0]
  return prompts.delta_from_sequence(sequence, base, frozen.word_index[c], frozen.delta_index[c], cfg.num_tokens)


# ---------------------------------------------------------------------------------------------- 5. defender


def _retain_loss(models, text_p, unet_p, ids, frozen, x_r, r_p, t_ddpm):
  words = _words(models, frozen, ids)
  return mse(_unet(models)(unet_p, x_r, t_ddpm, _encode(models)(text_p, words, _plain_eot(ids))), r_p)


def uses_retain_term(cfg: StepConfig) -> bool:
  """Whether the defender's loss has the retain term w L_r (retain mode `reg`)."""
  return cfg.retain.mode == "reg" and cfg.retain.weight > 0 and cfg.retain.batch > 0


def defender_update(cfg, models, state, frozen, c, prompt_seq, prompt_eot, adv_delta, points, xs, targets):
  """One Adam step on L_u + w L_r at the defender's shared (t_enc, t_ddpm) (spec 2.3). `prompt_eot`: the first EOT
  position of `prompt_seq` (SDXL's pooled position)."""
  encode, unet = _encode(models), _unet(models)
  words_c = _words(models, frozen, frozen.concept_ids[c])
  retain_ids = frozen.retain_ids[points.retain.prompt]
  layout = (frozen.word_index[c], frozen.delta_index[c])
  use_reg = uses_retain_term(cfg)
  _, x_c, x_r = xs

  def concept_condition(text_p):
    if adv_delta is not None:
      clean = encode(text_p, words_c[None])[0]
      return _broadcast_batch(prompts.build_sequence(clean, adv_delta, *layout), cfg.concept_batch)
    eot = jnp.broadcast_to(prompt_eot, (cfg.concept_batch,))
    return encode(text_p, _broadcast_batch(prompt_seq, cfg.concept_batch), eot)

  def loss_fn(params):
    text_p, unet_p = student_params(cfg, models, frozen, params)
    loss_u = mse(unet(unet_p, x_c, points.concept.t_ddpm, concept_condition(text_p)), targets.esd)
    loss_r = jnp.zeros(())
    if use_reg:
      loss_r = _retain_loss(models, text_p, unet_p, retain_ids, frozen, x_r, targets.retain, points.retain.t_ddpm)
    return loss_u + cfg.retain.weight * loss_r, (loss_u, loss_r)

  (loss, (loss_u, loss_r)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return state._replace(params=params, opt_state=opt_state), dict(loss=loss, loss_unlearn=loss_u, loss_retain=loss_r)


def retain_iter_steps(cfg, models, state, frozen, key, retain_idx):
  """retain mode `iter`: `retain.steps` extra Adam steps on the unweighted retain loss, step i on the prompts
  `retain_idx[i]`, each at fresh points rolled out by the UNet as it now stands (for UNet methods it just
  changed)."""
  opt = optimizer(cfg)

  def body(i, carry):
    params, opt_state, bank, _ = carry
    retain_ids = frozen.retain_ids[retain_idx[i]]
    k_t, k_n = jax.random.split(jax.random.fold_in(key, i))
    t = timesteps.draw_timesteps(k_t, ddim_steps=frozen.tables.timesteps.shape[0])
    empty = _rows(cfg, k_t, t, jnp.zeros((0,), jnp.int32), 1)
    points = IterationPoints(empty, empty, _rows(cfg, k_n, t, retain_idx[i], cfg.bank.retain_trajectories))
    text_p, unet_p = student_params(cfg, models, frozen, params)
    xs, _ = roll_out(cfg, models, frozen, jax.lax.stop_gradient(unet_p), bank, points)
    r_p = frozen_predictions(cfg, models, frozen, points, xs).retain
    loss = lambda p: _retain_loss(
      models, *student_params(cfg, models, frozen, p), retain_ids, frozen, xs[2], r_p, points.retain.t_ddpm
    )
    value, g = jax.value_and_grad(loss)(params)
    u, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, u), opt_state, bank, value

  init = (state.params, state.opt_state, state.bank, jnp.zeros(()))
  params, opt_state, _, loss_r = jax.lax.fori_loop(0, cfg.retain.steps, body, init)
  return state._replace(params=params, opt_state=opt_state), loss_r


# ---------------------------------------------------------------------------------------------- the iteration


def train_step(
  cfg: StepConfig,
  models: Models,
  state: TrainState,
  frozen: Frozen,
  batch: Batch,
  with_attack: bool,
  new_prompt: bool = True,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`with_attack`: past warm-up, the defender trains on the adversarial prompt. `new_prompt`: this iteration
  draws the concept and (with the attack) searches a new adversarial prompt; otherwise (attack.update_every)
  both are the latest update's, as the reference reuses them."""
  keys = iteration_keys(batch.key)
  text_theta, unet_theta = student_params(cfg, models, frozen, state.params)
  prompt_key = batch.key if batch.prompt_key is None else batch.prompt_key
  c = jax.random.randint(iteration_keys(prompt_key)["concept"], (), 0, frozen.concept_ids.shape[0])
  attacking = with_attack and new_prompt

  points = draw_points(cfg, frozen, keys, c, batch.retain_idx, attacking)
  xs, rollout = roll_out(cfg, models, frozen, jax.lax.stop_gradient(unet_theta), state.bank, points)
  targets = frozen_predictions(cfg, models, frozen, points, xs)

  metrics = {}
  adv_delta = None
  if attacking:
    point = (xs[0], points.attack.t_ddpm, targets.attack_e_p)
    result = attack(cfg, models, state, frozen, keys, c, text_theta, unet_theta, point, batch.restart)
    metrics.update(attack_loss_first=result.first_loss, attack_loss_last=result.last_loss)
    state = state._replace(last_sequence=result.sequence, has_last=jnp.ones((), bool), last_delta=result.delta)
  if with_attack:  # the sequence just searched, or between updates the latest one
    prompt_seq = state.last_sequence
    prompt_eot = _layout_eot(frozen.concept_ids[c], frozen.word_index[c], frozen.delta_index[c])
    if cfg.attack.embedding == "condition_embd":
      adv_delta = condition_delta(cfg, models, frozen, c, text_theta, prompt_seq)
  else:  # warm-up: the clean concept, all 77 original ids
    prompt_seq = _words(models, frozen, frozen.concept_ids[c])
    prompt_eot = _plain_eot(frozen.concept_ids[c])

  state, losses = defender_update(cfg, models, state, frozen, c, prompt_seq, prompt_eot, adv_delta, points, xs, targets)
  metrics.update(losses)
  if cfg.retain.mode == "iter":
    iter_idx = batch.iter_retain_idx
    if iter_idx is None:
      iter_idx = jnp.broadcast_to(batch.retain_idx, (cfg.retain.steps, *batch.retain_idx.shape))
    state, metrics["loss_retain"] = retain_iter_steps(cfg, models, state, frozen, keys["iter"], iter_idx)
  bank = state.bank
  if bank is not None and (cfg.bank.refresh_trajectories or cfg.bank.refresh_retain):
    key = jax.random.fold_in(batch.key, len(KEY_NAMES))
    bank = bank_lib.renew(cfg.bank, models.unet, frozen, bank, key, state.step, cfg.start_guidance)

  metrics.update(
    t_enc=points.concept.t_enc[0],
    concept=c,
    rollout_calls=rollout.calls,
    rollout_computed_rows=rollout.computed_rows,
    rollout_useful_rows=rollout.useful_rows,
  )
  state = _track_divergence(state, metrics)
  # Parameters and Adam state keep their (FSDP) layout; the bank stays replicated.
  state = sharding.constrain_params(state._replace(step=state.step + 1, bank=None), models.mesh)
  return state._replace(bank=bank), metrics

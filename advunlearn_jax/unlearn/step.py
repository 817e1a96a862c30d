"""One AdvUnlearn outer iteration, jitted: attack (after warm-up), then one defender update (spec 2.3-2.4).

`train_step(state, frozen, batch)` is pure. `state` (trainable leaves, Adam state, the latest adversarial
sequence) is donated; `frozen` (the original UNet and CLIP, the prompts' frozen encodings and layouts) never
is. Per-iteration randomness is `fold_in(root_key, step)`, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from advunlearn_jax import sharding
from advunlearn_jax.diffusion import ddim
from advunlearn_jax.models.clip_text import CLIPTextModel
from advunlearn_jax.models.unet import UNet2DConditionModel
from advunlearn_jax.sharding import constrain_batch
from advunlearn_jax.unlearn import attack as attack_lib
from advunlearn_jax.unlearn import bank as bank_lib
from advunlearn_jax.unlearn import draws, prompts, trainable


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Everything static about a step (hashable: part of the jit cache key)."""

  method: str = "text_encoder_full"
  lr: float = 1e-5
  negative_guidance: float = 1.0
  start_guidance: float = 3.0
  concept_batch: int = 1
  retain_batch: int = 5
  retain_mode: str = "reg"
  retain_weight: float = 1.0
  retain_steps: int = 1
  attack: attack_lib.AttackConfig = attack_lib.AttackConfig()
  attack_init: str = "random"
  latest_init_quirk: bool = True  # reference quirk: spec 3.1 - `latest` slices positions 1..k
  num_tokens: int = 1  # k; for `add`, the longest concept's token count
  latent_hw: int = 64
  latent_channels: int = 4


class Frozen(NamedTuple):
  unet: Any  # U_o: also U_theta's non-trained leaves
  clip: Any  # E_o: also E_theta's non-trained leaves
  emb_uncond: jax.Array  # [77, D] E_o("")
  concept_ids: jax.Array  # [C, 77]
  concept_emb: jax.Array  # [C, 77, D] E_o(c)
  word_index: jax.Array  # [C, 77] layout maps
  delta_index: jax.Array  # [C, 77]
  retain_ids: jax.Array  # [N, 77]
  retain_emb: jax.Array  # [N, 77, D] E_o(c_r)
  tables: ddim.DDIMTables


class TrainState(NamedTuple):
  step: jax.Array
  params: dict  # flat {path: leaf}: the trained leaves only
  opt_state: Any
  last_sequence: jax.Array  # [77, D] the latest adversarial sequence (for `latest` init)
  has_last: jax.Array  # bool


class Batch(NamedTuple):
  retain_idx: jax.Array  # [retain_batch] int32, drawn on the host without replacement per epoch
  key: jax.Array  # the iteration's key: fold_in(root_key, step)


class Models(NamedTuple):
  clip: CLIPTextModel
  unet: UNet2DConditionModel
  text_mask: frozenset  # trainable.selected_paths(...)
  unet_mask: frozenset
  mesh: Mesh | None = None  # batches split over its `data` axis


def optimizer(cfg: StepConfig) -> optax.GradientTransformation:
  return optax.adam(cfg.lr, b1=0.9, b2=0.999, eps=1e-8)


def init_state(cfg: StepConfig, models: Models, frozen: Frozen) -> TrainState:
  # Copies: the state is donated to every step, and must never alias the frozen originals.
  params = jax.tree.map(jnp.copy, _trained_leaves(cfg, models, frozen))
  d = frozen.concept_emb.shape[-1]
  return TrainState(
    jnp.zeros((), jnp.int32), params, optimizer(cfg).init(params), jnp.zeros((77, d)), jnp.zeros((), bool)
  )


def _trained_leaves(cfg, models, frozen):
  if trainable.is_text_method(cfg.method):
    return trainable.split(frozen.clip, models.text_mask)[0]
  return trainable.split(frozen.unet, models.unet_mask)[0]


def student_params(cfg: StepConfig, models: Models, frozen: Frozen, params: dict) -> tuple[Any, Any]:
  """(E_theta params, U_theta params): the trained leaves merged into the frozen originals."""
  if trainable.is_text_method(cfg.method):
    return trainable.merge(params, trainable.split(frozen.clip, models.text_mask)[1]), frozen.unet
  return frozen.clip, trainable.merge(params, trainable.split(frozen.unet, models.unet_mask)[1])


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.mean((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)


def esd_target(e_0: jax.Array, e_p: jax.Array, eta: float) -> jax.Array:
  """e_0 - eta * (e_p - e_0): away from the concept (spec 2.3; 2 e_0 - e_p for eta = 1)."""
  return e_0 - eta * (e_p - e_0)


def train_step(
  cfg: StepConfig,
  models: Models,
  state: TrainState,
  frozen: Frozen,
  batch: Batch,
  with_attack: bool,
  bank: bank_lib.Bank | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`bank` given: x_t comes from precomputed trajectories instead of a partial-DDIM rollout per loss."""
  keys = dict(zip(("concept", "attack", "init", "t", "noise_c", "noise_r", "iter"), jax.random.split(batch.key, 7)))
  unet_apply = lambda p, x, t, ctx: models.unet.apply({"params": p}, x, t, ctx)
  encode = lambda p, embeds: models.clip.apply({"params": p}, inputs_embeds=embeds).last_hidden_state
  token_table = frozen.clip["embeddings"]["token_embedding"]["embedding"]
  text_theta, unet_theta = student_params(cfg, models, frozen, state.params)
  shape = (cfg.latent_hw, cfg.latent_hw, cfg.latent_channels)

  c = jax.random.randint(keys["concept"], (), 0, frozen.concept_ids.shape[0])
  words_c = token_table[frozen.concept_ids[c]]  # one_hot(ids) @ TokEmb
  emb_p = frozen.concept_emb[c]

  def concept_point(key, n, unet_params):
    k_t, k_noise = jax.random.split(key)
    ts = draws.draw_timesteps(k_t, ddim_steps=frozen.tables.timesteps.shape[0])
    if bank is not None:
      return ts, constrain_batch(bank_lib.concept_latents(bank, k_noise, c, ts.t_enc, n), models.mesh)
    noise = constrain_batch(jax.random.normal(k_noise, (n, *shape)), models.mesh)
    x_t = draws.rollout(
      unet_apply,
      unet_params,
      noise,
      draws.broadcast_batch(emb_p, n),
      draws.broadcast_batch(frozen.emb_uncond, n),
      ts.t_enc,
      frozen.tables,
      cfg.start_guidance,
    )
    return ts, x_t

  metrics = {}
  # word_embd: delta lives among the word embeddings, before CLIP. condition_embd: delta rows are placed into the
  # encoder's output (the UNet conditioning) of the clean prompt; the reference builds that tensor once and never
  # rebuilds it (spec 3.3), here it follows the current encoder, so the defender still trains through the clean rows.
  in_condition = cfg.attack.embedding == "condition_embd"
  frozen_text, frozen_unet = jax.lax.stop_gradient((text_theta, unet_theta))
  layout = (frozen.word_index[c], frozen.delta_index[c])
  adv_delta = None
  if with_attack:
    k = cfg.num_tokens
    base = encode(frozen_text, words_c[None])[0] if in_condition else words_c
    if in_condition:  # random init: the conditioning rows of k random tokens after SOT
      ids = jax.random.randint(keys["init"], (k,), 0, token_table.shape[0])
      rand_ids = jnp.concatenate([frozen.concept_ids[c][:1], ids, jnp.full((77 - 1 - k,), frozen.concept_ids[c][-1])])
      random_init = encode(frozen_text, token_table[rand_ids][None])[0, 1 : 1 + k]
    else:
      random_init = attack_lib.random_rows(keys["init"], token_table, k)
    if cfg.attack_init == "latest":
      if cfg.latest_init_quirk:
        latest = prompts.initial_rows_from_sequence(state.last_sequence, k)
      else:
        latest = prompts.delta_from_sequence(state.last_sequence, base, *layout, k)
      delta0 = jnp.where(state.has_last, latest, random_init)
    else:
      delta0 = random_init

    def attack_loss(seq, key):
      ts, x_t = concept_point(key, 1, frozen_unet)
      e_p = draws.predict(unet_apply, frozen.unet, x_t, ts.t_ddpm, emb_p[None])
      cond = seq[None] if in_condition else encode(frozen_text, seq[None])
      e_adv = unet_apply(frozen_unet, x_t, jnp.broadcast_to(ts.t_ddpm, (1,)), cond)
      return mse(e_adv, e_p)

    result = attack_lib.run(cfg.attack, keys["attack"], delta0, base, *layout, attack_loss)
    prompt_seq = result.sequence
    if in_condition:  # the rows the defender will see, re-placed onto the encoder output it trains
      adv_delta = prompts.delta_from_sequence(result.sequence, base, *layout, k)
    metrics.update(attack_loss_first=result.first_loss, attack_loss_last=result.last_loss)
    state = state._replace(last_sequence=prompt_seq, has_last=jnp.ones((), bool))
  else:
    prompt_seq = words_c  # warm-up: the clean concept, all 77 original ids

  def concept_condition(text_p):
    if adv_delta is not None:
      clean = encode(text_p, words_c[None])[0]
      return draws.broadcast_batch(prompts.build_sequence(clean, adv_delta, *layout), cfg.concept_batch)
    return encode(text_p, draws.broadcast_batch(prompt_seq, cfg.concept_batch))

  # One shared (t_enc, t_ddpm) for the unlearning and retain terms (spec 8.11).
  ts, x_t = concept_point(keys["t"], cfg.concept_batch, unet_theta)
  e_0 = draws.predict(
    unet_apply, frozen.unet, x_t, ts.t_ddpm, draws.broadcast_batch(frozen.emb_uncond, cfg.concept_batch)
  )
  e_p = draws.predict(unet_apply, frozen.unet, x_t, ts.t_ddpm, draws.broadcast_batch(emb_p, cfg.concept_batch))
  target = esd_target(e_0, e_p, cfg.negative_guidance)

  def retain_point(key, t_enc, t_ddpm, unet_params):
    cond = frozen.retain_emb[batch.retain_idx]
    if bank is not None:
      x_r = constrain_batch(bank_lib.retain_latents(bank, key, batch.retain_idx, t_enc), models.mesh)
    else:
      noise = constrain_batch(jax.random.normal(key, (cfg.retain_batch, *shape)), models.mesh)
      uncond = draws.broadcast_batch(frozen.emb_uncond, cfg.retain_batch)
      x_r = draws.rollout(unet_apply, unet_params, noise, cond, uncond, t_enc, frozen.tables, cfg.start_guidance)
    return x_r, draws.predict(unet_apply, frozen.unet, x_r, t_ddpm, cond)

  retain_words = token_table[frozen.retain_ids[batch.retain_idx]]
  use_reg = cfg.retain_mode == "reg" and cfg.retain_weight > 0
  if use_reg:
    x_r, r_p = retain_point(keys["noise_r"], ts.t_enc, ts.t_ddpm, unet_theta)

  def retain_loss(text_p, unet_p, x_r, r_p, t_ddpm):
    r_n = unet_apply(unet_p, x_r, jnp.broadcast_to(t_ddpm, (cfg.retain_batch,)), encode(text_p, retain_words))
    return mse(r_n, r_p)

  def loss_fn(params):
    text_p, unet_p = student_params(cfg, models, frozen, params)
    cond = concept_condition(text_p)
    e_n = unet_apply(unet_p, x_t, jnp.broadcast_to(ts.t_ddpm, (cfg.concept_batch,)), cond)
    loss_u = mse(e_n, target)
    loss_r = retain_loss(text_p, unet_p, x_r, r_p, ts.t_ddpm) if use_reg else jnp.zeros(())
    return loss_u + cfg.retain_weight * loss_r, (loss_u, loss_r)

  opt = optimizer(cfg)
  (loss, (loss_u, loss_r)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = opt.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  if cfg.retain_mode == "iter":  # extra Adam steps on the unweighted retain loss, fresh t and noise

    def iter_body(i, carry):
      params, opt_state, _ = carry
      k_t, k_n = jax.random.split(jax.random.fold_in(keys["iter"], i))
      ts_i = draws.draw_timesteps(k_t, ddim_steps=frozen.tables.timesteps.shape[0])
      text_p, unet_p = student_params(cfg, models, frozen, params)
      x_r, r_p = retain_point(k_n, ts_i.t_enc, ts_i.t_ddpm, unet_p)
      value, g = jax.value_and_grad(
        lambda p: retain_loss(*student_params(cfg, models, frozen, p), x_r, r_p, ts_i.t_ddpm)
      )(params)
      u, opt_state = opt.update(g, opt_state, params)
      return optax.apply_updates(params, u), opt_state, value

    params, opt_state, loss_r = jax.lax.fori_loop(0, cfg.retain_steps, iter_body, (params, opt_state, jnp.zeros(())))

  metrics.update(loss=loss, loss_unlearn=loss_u, loss_retain=loss_r, t_enc=ts.t_enc, concept=c)
  state = state._replace(step=state.step + 1, params=params, opt_state=opt_state)
  return sharding.constrain_params(state, models.mesh), metrics

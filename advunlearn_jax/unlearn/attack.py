"""The inner attack: soft prompt tokens that make the unlearned model predict the original model's concept
noise (spec section 3). One `lax.fori_loop` over attack steps, carrying delta, the optimiser state, the
accumulated gradient and the sequence built at the start of the step.

Faithful defaults (each a flag):
  * `accumulate_grad`: the reference never calls zero_grad, so step i uses G_i = sum_{j<=i} grad_j
    (reference quirk: spec 3.1);
  * `return_pre_final`: it returns the sequence built at the start of the last step, throwing the final
    update away (reference quirk: spec 3.2);
  * `pgd` is plain Adam without projection, as in the reference; `eps > 0` adds the L2 or Linf ball around
    the initial delta that the name promises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.unlearn import prompts

METHODS = ("pgd", "fast_at")
# What the attack minimises: `esd`, the reference's (the student's noise on the adversarial prompt against the
# original model's on the concept prompt, at x_t the original rolled out); `inversion`, CCE's (textual inversion's
# denoising loss on images of the concept, esd/concept_inversion.py:951-980 of NYU-DICE-Lab/circumventing-concept-
# erasure); `both`, their sum.
OBJECTIVES = ("esd", "inversion", "both")
INITS = ("random", "latest")
EMBEDDINGS = ("word_embd", "condition_embd")


class AttackConfig(NamedTuple):
  """The inner attack's settings, under config.attack's field names: a new knob is a field here and a default in
  config_lib, nothing else (no defaults here: config_lib's are the only ones)."""

  method: str  # METHODS
  steps: int
  lr: float
  embedding: str  # EMBEDDINGS
  accumulate_grad: bool
  return_pre_final: bool
  eps: float  # 0: no projection (the reference)
  norm: str  # l2 | linf
  init: str  # delta's start: random vocabulary rows, or `latest` (the previous round's rows)
  latest_init_quirk: bool  # reference quirk: spec 3.1 - `latest` slices positions 1..k
  objective: str  # OBJECTIVES

  @classmethod
  def from_config(cls, section) -> AttackConfig:
    """`config.attack`'s step settings, validated."""
    cfg = cls(**{name: section[name] for name in cls._fields})
    validate(cfg)
    return cfg


class AttackResult(NamedTuple):
  sequence: Any  # [77, D] the adversarial sequence (word embeddings, or conditioning for condition_embd)
  delta: Any  # [k, D] the adversarial rows that built `sequence` (SDXL: both a pair, one per text tower)
  first_loss: jax.Array
  last_loss: jax.Array


def validate(cfg: AttackConfig) -> None:
  if cfg.method not in METHODS:
    raise ConfigError(f"config.attack.method is {cfg.method!r}; valid: {list(METHODS)}")
  if cfg.embedding not in EMBEDDINGS:
    raise ConfigError(f"config.attack.embedding is {cfg.embedding!r}; valid: {list(EMBEDDINGS)}")
  if cfg.objective not in OBJECTIVES:
    raise ConfigError(f"config.attack.objective is {cfg.objective!r}; valid: {list(OBJECTIVES)}")
  if cfg.init not in INITS:
    raise ConfigError(f"config.attack.init is {cfg.init!r}; valid: {list(INITS)}")
  if cfg.norm not in ("l2", "linf"):
    raise ConfigError(f"config.attack.norm is {cfg.norm!r}; valid: ['l2', 'linf']")
  if cfg.steps < 1:
    raise ConfigError(f"config.attack.steps must be >= 1, got {cfg.steps}")


def random_rows(key: jax.Array, token_embedding: jax.Array, k: int) -> jax.Array:
  """k rows of the token table, ids uniform over the whole vocabulary (SOT/EOT included, as the reference)."""
  ids = jax.random.randint(key, (k,), 0, token_embedding.shape[0])
  return token_embedding[ids]


def project(delta: jax.Array, center: jax.Array, eps: float, norm: str) -> jax.Array:
  diff = delta - center
  if norm == "linf":
    return center + jnp.clip(diff, -eps, eps)
  n = jnp.linalg.norm(diff, axis=-1, keepdims=True)
  return center + diff * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))


def run(
  cfg: AttackConfig,
  delta0: jax.Array,
  word_embeds: jax.Array,
  word_index: jax.Array,
  delta_index: jax.Array,
  attack_loss: Callable[[jax.Array, Any], jax.Array],
  points: Any,
) -> AttackResult:
  """Minimises `attack_loss(sequence, point)` over delta, the sequence being `word_embeds` (word embeddings, or
  the clean prompt's conditioning for condition_embd) with delta placed by the layout. Step i sees training
  point i of `points` (a pytree with a leading axis of `cfg.steps`): fresh t and noise per step (spec 3.2).

  `delta0` and `word_embeds` may be matching pytrees (SDXL's pair of towers): one layout places every leaf's rows,
  the sign, accumulation and projection act per leaf, and Adam's moments are per leaf as they are per element."""
  opt = optax.adam(cfg.lr)
  tree = jax.tree.map

  def build(delta):
    return tree(lambda w, d: prompts.build_sequence(w, d, word_index, delta_index), word_embeds, delta)

  def body(i, carry):
    delta, opt_state, acc, _, first, _ = carry
    point = jax.tree.map(lambda a: a[i], points)
    loss, grad = jax.value_and_grad(lambda d: attack_loss(build(d), point))(delta)
    acc = tree(jnp.add, acc, grad) if cfg.accumulate_grad else grad
    if cfg.method == "fast_at":
      acc = tree(jnp.sign, acc)  # the reference overwrites .grad with its sign, so the sign is what accumulates
    updates, opt_state = opt.update(acc, opt_state, delta)
    new_delta = optax.apply_updates(delta, updates)
    if cfg.eps > 0:
      new_delta = tree(lambda d, d0: project(d, d0, cfg.eps, cfg.norm), new_delta, delta0)
    first = jnp.where(i == 0, loss, first)
    return new_delta, opt_state, acc, delta, first, loss

  zeros = tree(jnp.zeros_like, delta0)
  init = (delta0, opt.init(delta0), zeros, delta0, jnp.zeros(()), jnp.zeros(()))
  delta, _, _, delta_at_last_step, first, last = jax.lax.fori_loop(0, cfg.steps, body, init)
  if cfg.return_pre_final:
    delta = delta_at_last_step
  return AttackResult(jax.lax.stop_gradient(build(delta)), jax.lax.stop_gradient(delta), first, last)

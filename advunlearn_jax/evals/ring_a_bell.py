"""Ring-A-Bell (Tsai et al., ICLR 2024): the model-agnostic discrete prompt search of chiayi-hsu/Ring-A-Bell.

It never looks at the erased model. A concept vector is the mean difference of the text encoder's hidden states
between prompts with and without the concept (Get_Concept_Vector.ipynb); the target of an evaluation prompt is
its hidden states plus eta times that vector (InversePrompt.ipynb:172-174); a genetic search over `length`
token ids finds the prompt whose hidden states come closest to the target (sum of squared errors over all
77 x D, :113-117). The prompt found replaces the evaluation prompt, decoded to text (:189) and tokenised again
where it is used. The search runs on the *original* model's text encoder (:60, "all the erasure models built on
SDv1-4"), so one prompt per (case, length, eta) serves every model under test.

Notebook references are lines of the raw JSON files (`git show HEAD:InversePrompt.ipynb | cat -n`), one source
line a JSON line.

The original population changes size each generation (the best population//2 kept, each followed by two
crossover children with probability crossover_rate: about 100 + 2 x Binomial(100, 0.5)). Here it lives in a
fixed array of 3 x (population//2) rows (every parent crossing over) with a validity mask; invalid rows score
+inf and are never selected. Generations run in one jitted `lax.fori_loop` between checkpoints, so nothing leaves
the device per generation. Fitness is a pure function of a row, so a row is scored once: a parent keeps its
score until a mutation changes it, and only the new rows (children and mutated parents, about 125 of the
original's ~200 at the published rates) go through the encoder, in fixed-size chunks. The result is the same
as scoring every row every generation, as the original does.

Randomness comes from `seed` alone (the original seeds nothing): the initial population from one key, each
generation's draws from `fold_in(key, generation)`, so where the checkpoints fall never changes the search.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import unlearndiff
from advunlearn_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, encode_ids

TINY_WORLD = "tiny_world:"
SEQ_LEN = tok_lib.MAX_LENGTH  # 77: the candidates' and the target's length (:172, :175)
SOT, EOT = 49406, 49407  # :98 (the notebook's note): <|startoftext|>, <|endoftext|>
# Free token ids are drawn from [1, 49406): neither "!" (0) nor SOT nor EOT (:135, :175; the comment at :135
# names 40496/40497, a typo for 49406/49407).
ID_LOW, ID_HIGH = 1, 49406
MAX_LENGTH = SEQ_LEN - 2  # :39 "for K = 77, please set length = 75": SOT and at least one EOT around the free ids
CHUNK = 32  # rows per encoder call while scoring (a multiple of it covers the population)
ENCODE_BATCH = 64  # prompts per encoder call for the concept vector and the targets
# Part of a remembered search's fingerprint (evals/search_cache.py): bump it when what a search finds changes.
SEARCH_VERSION = 1


class RingABellConfig(NamedTuple):
  """config.evaluation.ring_a_bell under its field names, and the shared evaluation.latents (their defaults
  config_lib's)."""

  population: int  # the first generation's size; population//2 survive each generation (:35, :179)
  generations: int  # :36, no early stop
  mutate_rate: float  # per individual, one token (:37, :131-137)
  crossover_rate: float  # per surviving parent, two children (:38, :119-129)
  length: int  # K free tokens (:39)
  eta: float  # the concept vector's weight in the target (:40, cof)
  vector: str  # a (77, D) .npy, a CSV of pairs, or tiny_world:VALUE (`concept_vector`)
  mutate_best: bool  # reference quirk (`breed`): the best survivor can be mutated too; False keeps it (elitism)
  # The classified images of the found prompt (the repo has no evaluation code).
  scheduler: str
  sample_steps: int
  latents: str  # start latents: generation.LATENT_SOURCES

  @classmethod
  def from_config(cls, evaluation) -> RingABellConfig:
    """`config.evaluation.ring_a_bell` (and the shared `evaluation.latents`), validated, with
    `evaluation.budgets` checked against it."""
    section = evaluation.ring_a_bell
    cfg = cls(**{name: section[name] for name in cls._fields if name != "latents"}, latents=evaluation.latents)
    validate(cfg)
    check_budgets(evaluation.budgets, cfg)
    return cfg

  @property
  def prefix_tokens(self) -> int:
    """Token slots the attack takes in front of a prompt: none, its prompt replaces the evaluation prompt."""
    return 0

  @property
  def kept(self) -> int:
    """Survivors of each generation (:179, population_size//2)."""
    return self.population // 2

  @property
  def sampler(self) -> unlearndiff.Sampler:
    return unlearndiff.Sampler(self.scheduler, self.sample_steps, self.latents)

  def describe(self) -> dict[str, Any]:
    """The settings, for report.json."""
    return self._asdict()


def validate(cfg: RingABellConfig) -> None:
  key = "evaluation.ring_a_bell"
  if not 1 <= cfg.length <= MAX_LENGTH:
    raise ConfigError(f"{key}.length must be in 1..{MAX_LENGTH} (K=77 is length 75), got {cfg.length}")
  if cfg.population < 2:
    raise ConfigError(f"{key}.population must be >= 2 (population//2 survive each generation), got {cfg.population}")
  if cfg.generations < 1:
    raise ConfigError(f"{key}.generations must be >= 1, got {cfg.generations}")
  for name in ("mutate_rate", "crossover_rate"):
    if not 0.0 <= getattr(cfg, name) <= 1.0:
      raise ConfigError(f"{key}.{name} must lie in [0, 1], got {getattr(cfg, name)}")
  if not str(cfg.vector).strip():
    raise ConfigError(
      f"{key}.vector is empty: a (77, D) .npy concept vector, a CSV with columns prompt and prompt1 "
      "(Ring-A-Bell's Violence_30.csv) or tiny_world:VALUE"
    )
  cfg.sampler.check(key)


def check_budgets(budgets: Sequence[int], cfg: RingABellConfig) -> None:
  """Budgets are generations: the best candidate of generation b is the prompt of budget b."""
  bad = [b for b in budgets if not 1 <= b <= cfg.generations]
  if bad:
    raise ConfigError(
      f"evaluation.budgets {bad}: Ring-A-Bell budgets are generations in 1..ring_a_bell.generations={cfg.generations}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Concept vector and target


def _hidden_states(text_config: CLIPTextConfig, text_params: Any, tokenizer, prompts: Sequence[str]) -> np.ndarray:
  """float32 [N, 77, D]: last_hidden_state (after the final layer norm, no projection, the notebooks' `[0]`) of
  each prompt tokenised with max-length padding (the tokenizer's pad: EOT for SD 1.x) and truncation
  (Get_Concept_Vector.ipynb:38-39, InversePrompt.ipynb:172-173)."""
  ids = tok_lib.tokenize(tokenizer, list(prompts))
  out = []
  for start in range(0, len(ids), ENCODE_BATCH):  # one compiled shape: the last batch padded with its own rows
    batch = ids[start : start + ENCODE_BATCH]
    padded = np.concatenate([batch, np.repeat(batch[-1:], ENCODE_BATCH - len(batch), 0)])
    out.append(np.asarray(encode_ids(text_config, text_params, jnp.asarray(padded)))[: len(batch)])
  return np.concatenate(out).astype(np.float32)


def _pairs_from_csv(path: str) -> tuple[list[str], list[str]]:
  """Columns prompt (with the concept) and prompt1 (without), row by row (Violence_30.csv,
  Get_Concept_Vector.ipynb:34-49)."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if not rows or not {"prompt", "prompt1"} <= set(rows[0]):
    found = sorted(rows[0]) if rows else []
    raise ConfigError(
      f"evaluation.ring_a_bell.vector={path!r}: expected columns prompt (with the concept) and prompt1 "
      f"(without), found {found}"
    )
  return [r["prompt"] for r in rows], [r["prompt1"] for r in rows]


def concept_vector(text_config: CLIPTextConfig, text_params: Any, tokenizer, spec: str) -> np.ndarray:
  """float32 [77, D]: the concept's direction in this text encoder's hidden states.

  `spec`: a `.npy` file of shape (77, D) (the repo's `Concept Vectors/*.npy` are (77, 768): SD 1.x's encoder
  only); a CSV of pairs (columns prompt and prompt1); or `tiny_world:VALUE` (tiny/prompts.concept_vector_pairs).
  For pairs, the mean over pairs of last_hidden_state(with) - last_hidden_state(without), per position
  (Get_Concept_Vector.ipynb:59). The nudity notebook's 5 identical copies of each prompt and its deletion of 19
  of those 250 rows (:82-129, a NudeNet screening of its own prompts) only reweigh its 50 pairs; the shipped
  Nudity_vector.npy is their result, usable here as a .npy path, and CSV pairs are weighed equally as in the
  violence notebook (where the 5 copies change nothing).
  """
  key = "evaluation.ring_a_bell.vector"
  if spec.startswith(TINY_WORLD):
    from advunlearn_jax.tiny import prompts as tiny_prompts

    try:
      with_concept, without = tiny_prompts.concept_vector_pairs(spec[len(TINY_WORLD) :])
    except ValueError as e:
      raise ConfigError(f"{key}={spec!r}: {e}") from e
  elif not os.path.isfile(spec):
    raise ConfigError(f"{key}={spec!r}: no such file (a .npy vector, a CSV of pairs, or tiny_world:VALUE)")
  elif spec.endswith(".npy"):
    vec = np.load(spec)
    expected = (SEQ_LEN, text_config.hidden_size)
    if vec.shape != expected:
      raise ConfigError(
        f"{key}={spec!r} has shape {vec.shape}; this text encoder needs {expected} (a vector is only usable "
        "with the encoder it was computed with)"
      )
    return vec.astype(np.float32)
  else:
    with_concept, without = _pairs_from_csv(spec)
  hidden_with = _hidden_states(text_config, text_params, tokenizer, with_concept)
  hidden_without = _hidden_states(text_config, text_params, tokenizer, without)
  return np.mean(hidden_with - hidden_without, axis=0)


def target_embedding(
  text_config: CLIPTextConfig, text_params: Any, tokenizer, prompt: str, vector: np.ndarray, eta: float
) -> np.ndarray:
  """float32 [77, D]: the prompt's hidden states plus eta times the concept vector, every position, padding
  included (InversePrompt.ipynb:172-174)."""
  return _hidden_states(text_config, text_params, tokenizer, [prompt])[0] + np.float32(eta) * vector


# ----------------------------------------------------------------------------------------------------------------
# Fitness and the genetic search


def _sse(text_config: CLIPTextConfig, text_params: Any, ids: jax.Array, target: jax.Array) -> jax.Array:
  hidden = CLIPTextModel(text_config).apply({"params": text_params}, ids).last_hidden_state
  return jnp.sum((target[None] - hidden) ** 2, axis=(1, 2))


# [P] sum of squared errors of each candidate's hidden states to the target, over all 77 x D (:113-117).
fitness = jax.jit(_sse, static_argnums=0)


def initial_population(key: jax.Array, rows: int, length: int) -> jax.Array:
  """int32 [rows, 77]: [SOT, `length` ids uniform in [1, 49406), EOT x (76 - length)] (:175)."""
  free = jax.random.randint(key, (rows, length), ID_LOW, ID_HIGH, jnp.int32)
  return jnp.concatenate(
    [jnp.full((rows, 1), SOT, jnp.int32), free, jnp.full((rows, SEQ_LEN - 1 - length), EOT, jnp.int32)], axis=1
  )


class Population(NamedTuple):
  """The search state between generations, fixed-size: rows beyond the live ones are invalid."""

  ids: jax.Array  # int32 [C, 77]
  valid: jax.Array  # bool [C]
  score: jax.Array  # float32 [C]: the row's fitness, NaN where it is not known yet (new or mutated)
  best_ids: jax.Array  # int32 [77]: the best candidate of the last generation scored
  best_score: jax.Array  # float32 []


def capacity(population: int, chunk: int = CHUNK) -> int:
  """Rows of the fixed array: every survivor crossing over gives 3 x population//2 (at least the first
  generation's `population`), rounded up to whole scoring chunks."""
  rows = max(population, 3 * (population // 2))
  return -(-rows // chunk) * chunk


def breed(
  parents: jax.Array,
  parent_score: jax.Array,
  key: jax.Array,
  length: int,
  rows: int,
  mutate_rate,
  crossover_rate,
  mutate_best=True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(ids [rows, 77], valid [rows], score [rows]) of the next generation from the K sorted survivors.

  Crossover (:119-129): every parent stays; with p crossover_rate it picks a partner uniformly among the parents
  (itself included) and a cut uniform in [1, length], and both children join: p[:cut] + q[cut:] and
  q[:cut] + p[cut:]. Layout here: [parents, first children, second children, padding]. Mutation (:131-137):
  with p mutate_rate each row, parents included, gets one position in [1, length] set to a new id in
  [1, 49406).
  """
  k = parents.shape[0]
  k_cross, k_partner, k_cut, k_mutate, k_pos, k_value = jax.random.split(key, 6)
  cross = jax.random.uniform(k_cross, (k,)) < crossover_rate  # random.random() < crossoverRate (:123)
  partner = jax.random.randint(k_partner, (k,), 0, k)  # :124
  cut = jax.random.randint(k_cut, (k,), 1, length + 1)  # :125
  col = jnp.arange(SEQ_LEN)
  left = col[None, :] < cut[:, None]
  mate = parents[partner]
  pad = rows - 3 * k
  ids = jnp.concatenate(
    [parents, jnp.where(left, parents, mate), jnp.where(left, mate, parents), jnp.full((pad, SEQ_LEN), EOT, jnp.int32)]
  )
  valid = jnp.concatenate([jnp.ones((k,), bool), cross, cross, jnp.zeros((pad,), bool)])
  score = jnp.concatenate([parent_score, jnp.full((rows - k,), jnp.nan, jnp.float32)])
  # reference quirk: the mutation writes into the parents in place (`population[i][:, idx] = value`, :136, on the
  # very tensors `crossover` kept, :122), so any survivor, the best included, can be mutated: no elitism.
  mutate = jax.random.uniform(k_mutate, (rows,)) < mutate_rate  # :133
  mutate = mutate & ((jnp.arange(rows) > 0) | mutate_best)  # row 0: the best survivor
  pos = jax.random.randint(k_pos, (rows,), 1, length + 1)  # :134
  value = jax.random.randint(k_value, (rows,), ID_LOW, ID_HIGH, jnp.int32)  # :135
  hit = mutate[:, None] & (col[None, :] == pos[:, None])
  ids = jnp.where(hit, value[:, None], ids)
  score = jnp.where(mutate, jnp.nan, score)
  return ids, valid, score


def _score_new(text_config, chunk: int, ids, valid, score, params, target) -> jax.Array:
  """`score` with every valid row of unknown fitness scored, `chunk` rows per encoder call, only as many calls
  as there are such rows; invalid rows +inf."""
  need = valid & jnp.isnan(score)
  order = jnp.argsort(~need, stable=True)  # the rows to score first
  calls = (jnp.sum(need) + chunk - 1) // chunk

  def body(c, score):
    rows = jax.lax.dynamic_slice_in_dim(order, c * chunk, chunk)
    fresh = _sse(text_config, params, ids[rows], target)
    return score.at[rows].set(jnp.where(need[rows], fresh, score[rows]))

  score = jax.lax.fori_loop(0, calls, body, score)
  return jnp.where(valid, score, jnp.inf)


@functools.cache
def _generations_fn(text_config: CLIPTextConfig, kept: int, length: int, chunk: int):
  """The jitted loop over generations [start, stop) (compiled once per encoder and population shape; the block
  bounds, rates, target and weights are arguments)."""

  def generation_step(g, pop: Population, key, params, target, mutate_rate, crossover_rate, mutate_best):
    score = _score_new(text_config, chunk, pop.ids, pop.valid, pop.score, params, target)
    order = jnp.argsort(score)[:kept]  # ascending; the best population//2 survive (:177-179)
    parents, parent_score = pop.ids[order], score[order]
    # The last generation's draws are made and never used: the original breeds only `if step != generation - 1`
    # (:180), which changes nothing it returns.
    ids, valid, new_score = breed(
      parents, parent_score, jax.random.fold_in(key, g), length, pop.ids.shape[0], mutate_rate, crossover_rate,
      mutate_best,
    )  # fmt: skip
    return Population(ids, valid, new_score, parents[0], parent_score[0])

  @jax.jit
  def run(pop, start, stop, key, params, target, mutate_rate, crossover_rate, mutate_best):
    step = functools.partial(
      generation_step, key=key, params=params, target=target, mutate_rate=mutate_rate,
      crossover_rate=crossover_rate, mutate_best=mutate_best,
    )  # fmt: skip
    return jax.lax.fori_loop(start, stop, step, pop)

  return run


def initial_state(cfg: RingABellConfig, key: jax.Array, chunk: int = CHUNK) -> Population:
  rows = capacity(cfg.population, chunk)
  ids = initial_population(key, rows, cfg.length)
  valid = jnp.arange(rows) < cfg.population
  return Population(ids, valid, jnp.full((rows,), jnp.nan, jnp.float32), ids[0], jnp.float32(jnp.inf))


class Checkpoint(NamedTuple):
  generation: int  # 1-based: the best candidate after this many generations scored
  ids: np.ndarray  # int32 [length]: the free tokens (population[0][0][1:length+1], :189)
  fitness: float


def search(
  text_config: CLIPTextConfig,
  text_params: Any,
  target: np.ndarray,
  cfg: RingABellConfig,
  seed: int,
  checkpoints: Sequence[int] = (),
  chunk: int = CHUNK,
) -> list[Checkpoint]:
  """The genetic search towards `target` [77, D] (InversePrompt.ipynb:175-189): the best candidate of each
  checkpoint generation (1-based; () for cfg.generations alone), with its fitness. One jitted loop runs
  the generations between two checkpoints."""
  marks = sorted({int(c) for c in checkpoints}) or [cfg.generations]
  if marks[0] < 1 or marks[-1] > cfg.generations:
    raise ValueError(f"checkpoints must lie in 1..{cfg.generations}, got {list(checkpoints)}")
  k_init, k_generations = jax.random.split(jax.random.key(seed))
  pop = initial_state(cfg, k_init, chunk)
  run = _generations_fn(text_config, cfg.kept, cfg.length, chunk)
  target = jnp.asarray(target, jnp.float32)
  rates = (jnp.float32(cfg.mutate_rate), jnp.float32(cfg.crossover_rate), jnp.bool_(cfg.mutate_best))
  out, done = [], 0
  for mark in marks:
    pop = run(pop, done, mark, k_generations, text_params, target, *rates)
    best_ids, best_score = jax.device_get((pop.best_ids, pop.best_score))
    out.append(Checkpoint(mark, np.asarray(best_ids[1 : cfg.length + 1]), float(best_score)))
    done = mark
  return out


def prompt_text(tokenizer, ids: Sequence[int]) -> str:
  """The found prompt as the original writes it: `tokenizer.decode` of the free tokens (:189); it is tokenised
  again where it is used."""
  return tokenizer.decode([int(i) for i in ids])

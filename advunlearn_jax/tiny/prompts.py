"""The tiny world's prompt sets for a run that erases one attribute value: what it trains on, what it keeps, and
what the evaluation attacks (configs/tiny.py)."""

from __future__ import annotations

import itertools

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.tiny import world

EVAL_PROMPTS = 12  # UnlearnDiffAtk prompts per erased value: world.attribute_prompts(kind, value, 12)


def retain_prompts(concept: str, values: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Every full prompt (shape, colour, style) that does not name the concept: the retain set sees the same
  phrasing as the prompts the report and the attack use. `values`: only the prompts naming one of these other
  values of the concept's attribute (a texture's erasure blurs dots and checks and leaves plain shapes plain:
  benchmarks/results/tiny_tables/confusion_striped.md); empty, all of them."""
  kind, _ = world.attribute_of(concept)
  others = world.other_values(concept)
  unknown = [v for v in values if v not in others]
  if unknown:
    raise ConfigError(f"retain values {unknown} are not other {kind}s than {concept!r}; known: {others}")
  kept = {world.ATTRIBUTE_TYPES[kind].index(v) for v in values or others}
  combos = itertools.product(*(range(len(v)) for v in world.ATTRIBUTE_TYPES.values()))
  kinds = list(world.ATTRIBUTE_TYPES)
  return tuple(
    world.canonical_prompt(**dict(zip(kinds, combo))) for combo in combos if combo[kinds.index(kind)] in kept
  )


def concept_prompts(concept: str, variants: int = 6) -> tuple[str, ...]:
  """The erased concept in the world's phrasing, alone and in `variants` full prompts (the tiny text tower does
  not carry the erasure of 'a photo of a triangle' over to 'a photo of a striped red triangle' by
  itself; the reference also splits a concept into several prompts, its --seperator). The variants avoid the
  evaluation prompts, so the attack is measured on phrasings the run never trained on."""
  kind, index = world.attribute_of(concept)
  held_out = set(evaluation_prompts(concept))
  others = [k for k in world.ATTRIBUTE_TYPES if k != kind]
  ranges = [range(len(world.ATTRIBUTE_TYPES[k])) for k in others]
  full = [world.canonical_prompt(**{kind: index, others[0]: a, others[1]: b}) for a, b in itertools.product(*ranges)]
  free = [p for p in full if p not in held_out]
  picked = [free[(i * len(free)) // variants + i % 2] for i in range(variants)]
  return (world.canonical_prompt(**{kind: index}), *picked)


def evaluation_prompts(concept: str) -> tuple[str, ...]:
  """The prompts UnlearnDiffAtk attacks: the concept's value in the world's caption phrasings."""
  kind, index = world.attribute_of(concept)
  return tuple(world.attribute_prompts(kind, index, EVAL_PROMPTS))


def concept_vector_pairs(concept: str) -> tuple[list[str], list[str]]:
  """Ring-A-Bell's prompt pairs for the concept vector: every canonical prompt naming the value, and the same
  prompt without it ('a photo of a red triangle' / 'a photo of a red shape'), as its Violence_30.csv pairs a
  sentence with the concept and the same sentence without."""
  kind, index = world.attribute_of(concept)
  others = [k for k in world.ATTRIBUTE_TYPES if k != kind]
  combos = itertools.product(*(range(len(world.ATTRIBUTE_TYPES[k])) for k in others))
  pairs = [dict(zip(others, combo)) for combo in combos]
  return [world.canonical_prompt(**p, **{kind: index}) for p in pairs], [world.canonical_prompt(**p) for p in pairs]

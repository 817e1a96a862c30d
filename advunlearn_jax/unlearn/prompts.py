"""The 77-position word-embedding sequences the attacker optimises and the defender trains on (spec 3.3-3.4).

The reference splits the tokenized concept into [SOT (1) | mid (L) | replace (k) | eot (76 - L - k)], drops
the "replace" slice and inserts the k adversarial rows (delta) according to the attack type, so the sequence
stays 77 long. We compile each layout once, on the host, into two index maps

    word_index[p]  = which row of the clean word embeddings position p copies (-1: none),
    delta_index[p] = which adversarial row position p adds (-1: none),

so that building a sequence is one gather, jittable, and the same code serves every concept of a run (their
maps are stacked and chosen by a traced concept index).

`word_k` is not the reference's: it puts the k rows where the concept's words stand inside a longer concept prompt
("a photo of a <d1..dk>" from "a photo of a triangle"), which is where CCE's learned token stands at test time
(evals/inversion.py). The reference's `replace_k` drops the whole prompt instead. Its layout needs the words'
token spans (`spans`), which unlearn/frozen.py finds with the config's `attack.words`.

L is the number of BPE tokens of the concept by default. `faithful_word_split=True` reproduces the reference's
`len(concept.split())`, which for 'nudity' (nu + dity) and 'tench' (ten + ch) is 1, so the last sub-token
falls into the dropped slot and the adversarial prompt loses it (spec 8.6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.data import concept_words
from advunlearn_jax.errors import ConfigError

ATTACK_TYPES = ("prefix_k", "suffix_k", "replace_k", "add", "mid_k", "insert_k", "per_k_words", "word_k")
SEQ_LEN = 77


class Layout(NamedTuple):
  word_index: np.ndarray  # [77] int32
  delta_index: np.ndarray  # [77] int32
  num_tokens: int  # k (L for `add`)
  concept_len: int  # L


def concept_length(ids: np.ndarray, concept: str, eot_id: int, faithful_word_split: bool) -> int:
  """L: whitespace words (reference quirk: spec 3.3) or BPE tokens between SOT and the first EOT."""
  if faithful_word_split:  # reference quirk: spec 3.3, section 8.6
    return len(concept.split())
  return int(np.argmax(np.asarray(ids)[1:] == eot_id))


def layout(attack_type: str, concept_len: int, k: int, spans: Sequence[tuple[int, int]] = ()) -> Layout:
  """Index maps for one attack type, concept length L and k adversarial tokens. `spans` (word_k only): (start,
  length) of each occurrence of the concept's words among the prompt's L tokens, in order."""
  if attack_type not in ATTACK_TYPES:
    raise ConfigError(f"config.attack.type is {attack_type!r}; valid: {list(ATTACK_TYPES)}")
  big_l = concept_len
  if attack_type == "add":
    k = big_l  # additive: one delta per concept token
  if big_l < 1:
    raise ConfigError("the concept tokenizes to nothing; give a non-empty concept")
  if attack_type == "word_k":
    return _word_layout(big_l, k, spans)
  if 1 + big_l + k > SEQ_LEN:
    raise ConfigError(
      f"concept of {big_l} tokens plus {k} adversarial tokens does not fit in {SEQ_LEN} positions; "
      f"use a concept of at most {SEQ_LEN - 1 - k} tokens"
    )
  mid = list(range(1, 1 + big_l))
  eot = list(range(1 + big_l + k, SEQ_LEN))
  delta = [("d", j) for j in range(k)]
  w = lambda rows: [("w", r) for r in rows]
  if attack_type == "prefix_k":
    body = delta + w(mid)
  elif attack_type == "suffix_k":
    body = w(mid) + delta
  elif attack_type == "replace_k":
    body = delta + w([eot[0]] * big_l)  # the concept words become copies of the first EOT row
  elif attack_type == "add":
    body = [("wd", (r, j)) for j, r in enumerate(mid)] + w([eot[0]] * big_l)
  elif attack_type == "mid_k":
    half = big_l // 2
    body = w(mid[:half]) + delta + w(mid[half:])
  elif attack_type == "insert_k":
    step = big_l // (k + 1)
    body = []
    for j in range(k):
      body += w(mid[step * j : step * (j + 1)]) + [("d", j)]
    body += w(mid[step * k :])
  else:  # per_k_words; the reference crashes for k = 1, where this reduces to a prefix
    body = []
    for j in range(k - 1):
      body += [("d", j)] + w(mid[3 * j : 3 * j + 3])
    body += [("d", k - 1)] + w(mid[3 * (k - 1) :])
  return _maps([("w", 0)] + body + w(eot), k, big_l)


def _word_layout(big_l: int, k: int, spans: Sequence[tuple[int, int]]) -> Layout:
  """word_k: the prompt's own tokens, each occurrence of the concept's words replaced by the k rows, then the
  prompt's EOT and padding rows (the last one repeated where the prompt got longer)."""
  if not spans:
    raise ConfigError("attack.type=word_k needs the concept's words in every concept prompt (config.attack.words)")
  body, pos = [("w", 0)], 0
  for start, n in spans:
    if start < pos or n < 1 or start + n > big_l:
      raise ValueError(f"word spans must be ordered, disjoint and inside the prompt's {big_l} tokens: {spans}")
    body += [("w", r) for r in range(1 + pos, 1 + start)] + [("d", j) for j in range(k)]
    pos = start + n
  body += [("w", r) for r in range(1 + pos, 1 + big_l)]
  if len(body) + 1 > SEQ_LEN:
    raise ConfigError(
      f"a concept prompt of {big_l} tokens with {k} adversarial tokens in place of each of its {len(spans)} "
      f"occurrences of the concept's words needs {len(body) + 1} of {SEQ_LEN} positions; use a smaller "
      "attack.num_tokens or a shorter prompt"
    )
  tail = [("w", min(1 + big_l + j, SEQ_LEN - 1)) for j in range(SEQ_LEN - len(body))]
  return _maps(body + tail, k, big_l)


def _maps(entries: list, k: int, big_l: int) -> Layout:
  assert len(entries) == SEQ_LEN, len(entries)
  word_index = np.full(SEQ_LEN, -1, np.int32)
  delta_index = np.full(SEQ_LEN, -1, np.int32)
  for p, (kind, value) in enumerate(entries):
    if kind == "w":
      word_index[p] = value
    elif kind == "d":
      delta_index[p] = value
    else:
      word_index[p], delta_index[p] = value
  return Layout(word_index, delta_index, k, big_l)


def word_spans(tokenizer, prompt: str, words: Sequence[str]) -> list[tuple[int, int]]:
  """(start, length) among the prompt's BPE tokens of each occurrence of the concept's `words` (word_k's
  `spans`). CLIP's tokenizer splits words before BPE, so each piece tokenises as it does inside the prompt, except
  where its pre-tokenizer joins a word to the text beside it: "'t" + "riangle" in "a 'triangle'" (its contractions
  's 't 'd 'm 're 've 'll), refused, since no span of the prompt's tokens is the word there."""
  pieces, found = concept_words.split(prompt, words)
  ids = lambda text: list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"]) if text.strip() else []
  piece_ids, word_ids = [ids(p) for p in pieces], [ids(w) for w in found]
  spans, joined = [], []
  for piece, word in zip(piece_ids, word_ids):
    spans.append((len(joined) + len(piece), len(word)))
    joined += piece + word
  if found and joined + piece_ids[-1] != ids(prompt):
    raise ConfigError(
      f"config.concept.prompts: in {prompt[:80]!r} CLIP's tokenizer joins the concept's words {found} to the text "
      "beside them (a quote before a word that starts as 's 't 'd 'm 're 've 'll do reads as that contraction), so "
      "attack.type=word_k has no tokens of its own to replace; write the prompt without the quote"
    )
  return spans


def build_sequence(word_embeds: jax.Array, delta: jax.Array, word_index: jax.Array, delta_index: jax.Array):
  """[77, D] word embeddings with the adversarial rows placed by the layout (traceable)."""
  words = jnp.where((word_index >= 0)[:, None], word_embeds[jnp.maximum(word_index, 0)], 0.0)
  adv = jnp.where((delta_index >= 0)[:, None], delta[jnp.maximum(delta_index, 0)], 0.0)
  return words + adv


def initial_rows_from_sequence(sequence: jax.Array, num_tokens: int) -> jax.Array:
  """`latest` init as the reference does it: positions 1..k of the previous adversarial sequence.

  reference quirk: spec 3.1 - only right for prefix_k and replace_k; see `delta_from_sequence` for the fix.
  """
  return sequence[1 : 1 + num_tokens]


def delta_from_sequence(
  sequence: jax.Array, word_embeds: jax.Array, word_index: jax.Array, delta_index: jax.Array, num_tokens: int
) -> jax.Array:
  """Recovers delta from a built sequence for every layout (`add` subtracts the word rows)."""
  words = jnp.where((word_index >= 0)[:, None], word_embeds[jnp.maximum(word_index, 0)], 0.0)
  residual = sequence - words
  onehot = (delta_index[:, None] == jnp.arange(num_tokens)[None, :]).astype(sequence.dtype)  # [77, k]
  return onehot.T @ residual

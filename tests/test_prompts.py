"""Adversarial sequence layouts against the spec's worked table (section 3.4), in both split modes."""

import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.unlearn import prompts

SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.load_tokenizer()


REFERENCE_TYPES = [t for t in prompts.ATTACK_TYPES if t != "word_k"]  # word_k also needs the concept's words


def _layout_rows(tokenizer, concept, attack_type, k, faithful, words=()):
  """Builds the sequence from symbolic embeddings: row r of the word table is the vector r * e0, and
  adversarial row j is (1000 + j) * e1, so every position reads back as ('w', r), ('d', j) or both."""
  ids = tok_lib.tokenize(tokenizer, concept)[0]
  length = prompts.concept_length(ids, concept, EOT, faithful)
  lay = prompts.layout(attack_type, length, k, prompts.word_spans(tokenizer, concept, words) if words else ())
  words = jnp.stack([jnp.arange(77.0), jnp.zeros(77)], 1)
  delta = jnp.stack([jnp.zeros(lay.num_tokens), 1000.0 + jnp.arange(lay.num_tokens)], 1)
  seq = prompts.build_sequence(words, delta, jnp.asarray(lay.word_index), jnp.asarray(lay.delta_index))
  rows = []
  for w, d in np.asarray(seq):
    tokens = [ids[int(w)]] if w > 0 or not d else []
    rows.append(tuple(tokens) + ((f"d{int(d) - 999}",) if d else ()))
  return ids, rows, lay


def _names(tokenizer, ids_or_rows):
  out = []
  for row in ids_or_rows:
    out.append(
      "+".join(tokenizer.convert_ids_to_tokens([r])[0] if isinstance(r, (int, np.integer)) else r for r in row)
    )
  return out


def test_spec_worked_table(tokenizer):
  # 'nudity', prefix_k, k=1, faithful: [SOT, d1, nu, P, P, ...]: 'dity' sits in the dropped replace slot.
  ids, rows, lay = _layout_rows(tokenizer, "nudity", "prefix_k", 1, faithful=True)
  assert lay.concept_len == 1
  assert _names(tokenizer, rows[:5]) == ["<|startoftext|>", "d1", "nu", "<|endoftext|>", "<|endoftext|>"]
  assert all(tokenizer.convert_ids_to_tokens([int(r[0])])[0] != "dity</w>" for r in rows if r and r[0] != "d1")
  # Fixed (BPE count): [SOT, d1, nu, dity, P, ...].
  _, rows, lay = _layout_rows(tokenizer, "nudity", "prefix_k", 1, faithful=False)
  assert lay.concept_len == 2
  assert _names(tokenizer, rows[:5]) == ["<|startoftext|>", "d1", "nu", "dity</w>", "<|endoftext|>"]
  # 'Van Gogh', prefix_k, k=1: both split modes agree.
  for faithful in (True, False):
    _, rows, _ = _layout_rows(tokenizer, "Van Gogh", "prefix_k", 1, faithful)
    assert _names(tokenizer, rows[:5]) == ["<|startoftext|>", "d1", "van</w>", "gogh</w>", "<|endoftext|>"]
  # 'church', replace_k, k=1: the concept word is removed (replaced by the first EOT row).
  _, rows, _ = _layout_rows(tokenizer, "church", "replace_k", 1, faithful=True)
  assert _names(tokenizer, rows[:4]) == ["<|startoftext|>", "d1", "<|endoftext|>", "<|endoftext|>"]
  # 'garbage truck', add (k := 2): [SOT, garbage+d1, truck+d2, P, P, P, ...].
  _, rows, lay = _layout_rows(tokenizer, "garbage truck", "add", 1, faithful=True)
  assert lay.num_tokens == 2
  assert _names(tokenizer, rows[:5]) == [
    "<|startoftext|>",
    "garbage</w>+d1",
    "truck</w>+d2",
    "<|endoftext|>",
    "<|endoftext|>",
  ]
  # 'garbage truck', suffix_k, k=1.
  _, rows, _ = _layout_rows(tokenizer, "garbage truck", "suffix_k", 1, faithful=True)
  assert _names(tokenizer, rows[:5]) == ["<|startoftext|>", "garbage</w>", "truck</w>", "d1", "<|endoftext|>"]


@pytest.mark.parametrize("faithful", [True, False])
@pytest.mark.parametrize("attack_type", REFERENCE_TYPES)
def test_every_layout_keeps_77_rows_and_all_deltas(tokenizer, attack_type, faithful):
  concept = "a painting of a starry night by Vincent van Gogh"
  ids, rows, lay = _layout_rows(tokenizer, concept, attack_type, 3, faithful)
  assert len(rows) == 77
  used = sorted((r[-1] for r in rows if r and isinstance(r[-1], str)), key=lambda s: int(s[1:]))
  assert used == [f"d{j + 1}" for j in range(lay.num_tokens)]
  assert rows[0] == (SOT,)
  # The concept's own tokens, in order, minus any dropped into the replace slot.
  words = [r[0] for r in rows[1:] if r and not isinstance(r[0], str) and r[0] != EOT]
  if attack_type != "replace_k":
    assert words == list(ids[1 : 1 + lay.concept_len])


def test_mid_insert_and_per_k_words_positions(tokenizer):
  concept = "one two three four five six"  # six single-token words
  _, rows, _ = _layout_rows(tokenizer, concept, "mid_k", 1, True)
  assert _names(tokenizer, rows[1:9])[:8] == [
    "one</w>",
    "two</w>",
    "three</w>",
    "d1",
    "four</w>",
    "five</w>",
    "six</w>",
    "<|endoftext|>",
  ]
  _, rows, _ = _layout_rows(tokenizer, concept, "insert_k", 2, True)  # step = 6 // 3 = 2
  assert _names(tokenizer, rows[1:10]) == [
    "one</w>",
    "two</w>",
    "d1",
    "three</w>",
    "four</w>",
    "d2",
    "five</w>",
    "six</w>",
    "<|endoftext|>",
  ]
  _, rows, _ = _layout_rows(tokenizer, concept, "per_k_words", 2, True)
  assert _names(tokenizer, rows[1:10]) == [
    "d1",
    "one</w>",
    "two</w>",
    "three</w>",
    "d2",
    "four</w>",
    "five</w>",
    "six</w>",
    "<|endoftext|>",
  ]
  # per_k_words with k = 1 (a crash in the reference) is a prefix.
  _, rows, _ = _layout_rows(tokenizer, concept, "per_k_words", 1, True)
  assert _names(tokenizer, rows[1:3]) == ["d1", "one</w>"]


def test_word_k_puts_the_tokens_where_the_concepts_words_stand(tokenizer):
  """The k rows replace each occurrence of the concept's words (whole words, plural, any case) inside the prompt;
  the prompt's other tokens keep their order, then its EOT and padding rows."""
  _, rows, lay = _layout_rows(tokenizer, "a photo of a striped red triangle", "word_k", 3, False, ("triangle",))
  assert lay.num_tokens == 3 and lay.concept_len == 7
  assert _names(tokenizer, rows[:12]) == [
    "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "striped</w>", "red</w>", "d1", "d2", "d3",
    "<|endoftext|>", "<|endoftext|>",
  ]  # fmt: skip
  # A multi-token phrase named twice, once in the plural and capitalised: each occurrence gets the same k rows.
  prompt = "Van Gogh painted like van goghs"
  assert prompts.word_spans(tokenizer, prompt, ("van gogh",)) == [(0, 2), (4, 3)]
  _, rows, lay = _layout_rows(tokenizer, prompt, "word_k", 2, False, ("van gogh",))
  assert _names(tokenizer, rows[:8]) == [
    "<|startoftext|>", "d1", "d2", "painted</w>", "like</w>", "d1", "d2", "<|endoftext|>",
  ]  # fmt: skip
  # A word split into sub-tokens is replaced whole.
  assert prompts.word_spans(tokenizer, "a photo of nudity", ("nudity",)) == [(3, 2)]
  # Punctuation beside the word keeps the pieces' tokens the prompt's own; a quote that CLIP's pre-tokenizer reads as
  # a contraction ("'t" + "riangle") leaves no tokens of the word to replace, and is refused rather than misplaced.
  assert prompts.word_spans(tokenizer, "a triangle's (triangle)-shaped corner", ("triangle",)) == [(1, 1), (4, 1)]
  for quoted in ("a 'triangle' on paper", "the 'scream' by munch", "a 'dog' running"):
    with pytest.raises(ConfigError, match="joins the concept's words"):
      prompts.word_spans(tokenizer, quoted, ("triangle", "scream", "dog"))
  with pytest.raises(ConfigError, match="needs the concept's words"):
    prompts.layout("word_k", 4, 1)
  with pytest.raises(ConfigError, match="needs 78 of 77 positions"):
    prompts.layout("word_k", 74, 3, ((0, 1),))


def test_delta_recovery_and_latest_quirk(tokenizer):
  ids = tok_lib.tokenize(tokenizer, "garbage truck")[0]
  words = jnp.asarray(np.random.default_rng(0).normal(size=(77, 8)), jnp.float32)
  delta = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8)), jnp.float32)
  for attack_type in ("prefix_k", "suffix_k", "add", "mid_k"):
    lay = prompts.layout(attack_type, 2, 2)
    seq = prompts.build_sequence(words, delta, jnp.asarray(lay.word_index), jnp.asarray(lay.delta_index))
    got = prompts.delta_from_sequence(seq, words, jnp.asarray(lay.word_index), jnp.asarray(lay.delta_index), 2)
    np.testing.assert_allclose(got, delta, atol=1e-6)
    quirk = prompts.initial_rows_from_sequence(seq, 2)
    assert np.allclose(quirk, delta) == (attack_type == "prefix_k")
  del ids


def test_bad_inputs():
  with pytest.raises(ConfigError, match=r"valid: \['prefix_k'"):
    prompts.layout("prepend", 1, 1)
  with pytest.raises(ConfigError, match="at most 74 tokens"):
    prompts.layout("prefix_k", 76, 2)
  with pytest.raises(ConfigError, match="tokenizes to nothing"):
    prompts.layout("prefix_k", 0, 1)

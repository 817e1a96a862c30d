"""Where a prompt names the concept: its words found as whole words, so that an attack's tokens can stand in their
place. CCE's learned token is rendered there at test time (evals/inversion.py); the trainer's `word_k` attack puts
its adversarial tokens there (unlearn/prompts.py)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def pattern(words: Sequence[str]) -> re.Pattern:
  """The concept's words as whole words, case-insensitive (CLIP's tokenizer lowercases), any run of spaces or a
  hyphen between them, an English plural ending allowed ("triangles", "churches"); the longest first, so
  "Vincent van Gogh" is replaced whole where "Van Gogh" is also listed."""
  phrase = lambda w: r"[\s-]+".join(map(re.escape, w.split()))
  alternatives = "|".join(phrase(w) for w in sorted(words, key=len, reverse=True) if w.strip())
  return re.compile(rf"(?<!\w)(?:{alternatives})(?:e?s)?(?!\w)", re.IGNORECASE)


def split(prompt: str, words: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the text around each occurrence of the concept's words, the occurrences): n occurrences give n + 1 pieces;
  a prompt that names none gives one piece and no occurrence."""
  found = pattern(words)
  return found.split(prompt), [m.group(0) for m in found.finditer(prompt)]

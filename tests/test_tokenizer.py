"""The offline CLIP tokenizer: reference ids, vocabulary size, truncation, and openai/CLIP agreement."""

import importlib.util
import json
import os

import numpy as np
import pytest

from advunlearn_jax.data import tokenizer as tok_lib


@pytest.fixture(scope="module")
def tokenizer():
  return tok_lib.load_tokenizer()


def test_reference_ids(tokenizer):
  ids = tok_lib.tokenize(tokenizer, ["a photo of a church", "nudity", "Van Gogh"])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  pad = [49407] * 77
  np.testing.assert_array_equal(ids[0], ([49406, 320, 1125, 539, 320, 2735, 49407] + pad)[:77])
  np.testing.assert_array_equal(ids[1], ([49406, 1156, 16436, 49407] + pad)[:77])
  np.testing.assert_array_equal(ids[2], ([49406, 2451, 19697, 49407] + pad)[:77])


def test_vocabulary_files(tokenizer):
  folder = tok_lib.offline_tokenizer_folder()
  with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
    assert len(json.load(f)) == 49408
  with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
    lines = f.read().splitlines()
  assert lines[0].startswith("#version") and len(lines) - 1 == 48894
  assert len(tokenizer) == 49408


def test_agrees_with_openai_simple_tokenizer(tokenizer):
  """openai/CLIP's own BPE implementation, loaded from the package file without importing torch."""
  pytest.importorskip("ftfy")
  path = os.path.join(os.path.dirname(tok_lib.openai_bpe_path()), "simple_tokenizer.py")
  spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  reference = module.SimpleTokenizer(bpe_path=tok_lib.openai_bpe_path())
  prompts = ["Starry night by Vincent van Gogh!", "a tench, garbage-truck & parachute", "naïve café 123"]
  for prompt, ids in zip(prompts, tok_lib.tokenize(tokenizer, prompts)):
    expected = [49406] + reference.encode(prompt) + [49407]
    np.testing.assert_array_equal(ids[: len(expected)], expected)
    assert (ids[len(expected) :] == 49407).all()


def test_long_prompt_is_truncated_with_warning(tokenizer):
  with pytest.warns(UserWarning, match="truncated to 77"):
    ids = tok_lib.tokenize(tokenizer, ["word " * 100, "short"])
  assert ids.shape == (2, 77) and ids[0, -1] == 49407 and ids[0, 0] == 49406


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no vocab.json or tokenizer.json"):
    tok_lib.load_tokenizer(str(tmp_path))

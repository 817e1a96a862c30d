"""evals/search_cache.py: what identifies a remembered search, and replaying, resuming and finishing one."""

import copy
import dataclasses
import json

import numpy as np
import pytest

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import search_cache


def test_the_fingerprint_reads_every_weight_and_setting():
  params = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.int32)}
  key = search_cache.fingerprint(params, ("mma", 1, 7))
  assert key == search_cache.fingerprint({k: v.copy() for k, v in params.items()}, ("mma", 1, 7))
  moved = {k: v.copy() for k, v in params.items()}
  moved["a"][0, 0] = 1e-7
  others = [
    search_cache.fingerprint(moved, ("mma", 1, 7)),  # one weight
    search_cache.fingerprint({**params, "a": params["a"].astype(np.float64)}, ("mma", 1, 7)),  # its dtype
    search_cache.fingerprint({**params, "a": params["a"].reshape(3, 2)}, ("mma", 1, 7)),  # its shape
    search_cache.fingerprint({"c": params["a"], "b": params["b"]}, ("mma", 1, 7)),  # its name
    search_cache.fingerprint(params, ("mma", 2, 7)),  # the attack's version
    search_cache.fingerprint(params, ("mma", 1, 8)),  # a setting
  ]
  assert len({key, *others}) == 7


def _search(log: list, stop: int = 3):
  """A search of checkpoints 1..stop whose state is the checkpoint's number; `log` records the states it starts
  from."""

  def run(state):
    log.append(state)
    for step in range((state or 0) + 1, stop + 1):
      yield step, f"prompt {step}", step

  return run


def test_a_search_stopped_early_goes_on_from_its_state_in_a_new_process(tmp_path):
  log = []
  first = search_cache.SearchCache(str(tmp_path))
  found = first.step_by_step("k", _search(log))
  assert next(found) == (1, "prompt 1")
  found.close()  # the case broke at its first checkpoint
  assert json.load(open(tmp_path / "k.json")) == {"found": [[1, "prompt 1"]], "state": 1, "done": False}
  later = search_cache.SearchCache(str(tmp_path))
  assert list(later.step_by_step("k", _search(log))) == [(1, "prompt 1"), (2, "prompt 2"), (3, "prompt 3")]
  assert log == [None, 1]
  assert list(later.step_by_step("k", _search(log))) == [(1, "prompt 1"), (2, "prompt 2"), (3, "prompt 3")]
  assert list(search_cache.SearchCache(str(tmp_path)).step_by_step("k", _search(log)))[-1] == (3, "prompt 3")
  assert log == [None, 1]  # finished: replayed, never searched again
  assert not list(tmp_path.glob("*.tmp"))


def test_a_whole_search_is_computed_once_and_memory_alone_keeps_nothing_on_disk(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  calls = []
  compute = lambda: calls.append(1) or [(50, "a"), (100, "b")]  # noqa: E731
  memory = search_cache.for_folder("")
  assert memory is search_cache.for_folder("")
  assert list(memory.all_at_once("x", compute)) == [(50, "a"), (100, "b")]
  assert next(memory.all_at_once("x", compute)) == (50, "a") and calls == [1]
  assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_hold_searches_is_refused(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ConfigError, match="evaluation.search_cache=.*is a file"):
    search_cache.check_folder(str(tmp_path / "file"))
  search_cache.check_folder(str(tmp_path / "new" / "folder"))  # made on the first search
  search_cache.check_folder("")


def test_an_entry_is_never_replaced_by_less_and_an_unreadable_one_is_searched_again(tmp_path):
  """Two processes on one folder: one goes on from where the other's search stands, the one behind cannot write
  over what the other got to, and a file left unreadable counts as no search."""
  log = []
  ahead, behind = search_cache.SearchCache(str(tmp_path)), search_cache.SearchCache(str(tmp_path))
  found = behind.step_by_step("k", _search(log))
  assert next(found) == (1, "prompt 1")  # `behind` searches to checkpoint 1 ...
  assert list(ahead.step_by_step("k", _search(log)))[-1] == (3, "prompt 3")  # ... `ahead` goes on and finishes
  assert log == [None, 1]
  assert next(found) == (2, "prompt 2")  # `behind`'s own search goes on, and writes less than the folder holds
  assert json.load(open(tmp_path / "k.json")) == {"found": [[1, "prompt 1"], [2, "prompt 2"], [3, "prompt 3"]],
                                                  "state": 3, "done": True}  # fmt: skip
  found.close()
  (tmp_path / "k.json").write_text('{"found": [[1, "pro')
  assert list(search_cache.SearchCache(str(tmp_path)).step_by_step("k", _search(log)))[-1] == (3, "prompt 3")
  assert log == [None, 1, None] and json.load(open(tmp_path / "k.json"))["done"] is True


def test_an_encoder_is_its_weights_its_config_and_its_tokenizer():
  from advunlearn_jax import config_lib
  from advunlearn_jax.data import tokenizer as tok_lib
  from advunlearn_jax.models import clip_text

  config = clip_text.CLIPTextConfig(
    vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1
  )
  params = {"w": np.ones((8, 4), np.float32)}
  tokenizer = tok_lib.load_tokenizer(f"{config_lib.TINY_MODEL_DIR}/tokenizer")
  key = search_cache.encoder_fingerprint(config, params, tokenizer)
  assert key == search_cache.encoder_fingerprint(config, {"w": np.ones((8, 4), np.float32)}, tokenizer)
  other = copy.deepcopy(tokenizer)  # load_tokenizer's is shared
  other.add_tokens(["<concept>"])
  assert search_cache.encoder_fingerprint(config, params, other) != key
  eps = dataclasses.replace(config, layer_norm_eps=1e-6)  # nothing of it in the weights
  assert search_cache.encoder_fingerprint(eps, params, tokenizer) != key
  # A padded call in between (any other measurement in the process) is not a different tokenizer.
  fresh = copy.deepcopy(tokenizer)
  fresh(["a photo of a triangle"], padding="max_length", max_length=77, truncation=True)
  assert search_cache.encoder_fingerprint(config, params, fresh) == key

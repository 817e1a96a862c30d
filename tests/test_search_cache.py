"""evals/search_cache.py: what identifies a remembered search, and replaying, resuming and finishing one."""

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

"""Discrete searches, remembered by everything they read.

Ring-A-Bell searches the original model's text encoder and MMA-Diffusion the attacked one; neither looks at a
UNet or an image. So one search serves every model with the same text encoder (Ring-A-Bell: every model of a
concept; MMA: every UNet erasure and the base model, and an encoder plugged into another UNet), as the authors
transfer one prompt set to every erasure method. P4D reads both whole pipelines and renders on the attacked one:
its searches serve only the model they ran on, so a table run stopped midway goes on from its last case. A search
is remembered by a fingerprint of its inputs, in this process and, where `evaluation.search_cache` names a folder,
across processes (one JSON file a search): a table that measures many models over several sessions pays for
each search once.

A search that stopped early (its case broke at a checkpoint) is remembered with its state there, so a model that
needs more of it continues from that checkpoint instead of starting again; the continued search is the
uninterrupted one (tests/test_search_cache.py). Each attack's `SEARCH_VERSION` is part of the fingerprint: a
change to what a search computes bumps it, and nothing found before is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from advunlearn_jax.errors import ConfigError

Found = list[tuple[int, str]]  # (budget, prompt text) at each checkpoint reached


def fingerprint(arrays: Any, settings: Any) -> str:
  """sha256 of a pytree of arrays (each leaf's path, dtype, shape and bytes), of `settings`' repr and of the
  backend and JAX version that compute the search (another may round differently, and so find otherwise)."""
  h = hashlib.sha256(repr((settings, jax.default_backend(), jax.__version__)).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
    a = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def encoder_fingerprint(text_config: Any, text_params: Any, tokenizer) -> str:
  """What a text encoder and its tokenizer compute: the weights, the config (heads, activation, EOT id: nothing
  the weights hold) and the whole tokenizer (vocabulary, merges, special tokens)."""
  return fingerprint(text_params, (repr(text_config), _tokenizer_spec(tokenizer)))


def pipeline_fingerprint(pipe, tokenizer) -> str:
  """What a whole SD pipeline computes: its three models' weights and configs, its noise schedule and its
  tokenizer (a search that renders images or denoises, as P4D's, reads all of them)."""
  weights = {"text": pipe.text_params, "unet": pipe.unet_params, "vae": pipe.vae_params}
  configs = (repr(pipe.text_config), repr(pipe.unet_config), repr(pipe.vae_config), repr(pipe.schedule))
  return fingerprint(weights, (configs, _tokenizer_spec(tokenizer)))


def _tokenizer_spec(tokenizer) -> str:
  """The fast tokenizer's serialisation without its truncation and padding: transformers writes the last call's
  settings there (a padded call leaves `Fixed: 77` behind), so the same tokenizer serialised differently after
  another measurement in the same process, and a search already on disk (hours of Ring-A-Bell) was computed
  again. Every caller here passes its own padding and truncation."""
  spec = json.loads(tokenizer.backend_tokenizer.to_str())
  spec.pop("truncation", None)
  spec.pop("padding", None)
  return json.dumps(spec, sort_keys=True)


def _longer(a: dict | None, b: dict) -> dict:
  """Of two entries of one deterministic search, the one that got further (each holds the other's start)."""
  if a is None:
    return b
  return a if (a["done"], len(a["found"])) > (b["done"], len(b["found"])) else b


class SearchCache:
  """Searches by fingerprint: {"found": [[budget, text], ...], "state": the search's state after the last one,
  "done": whether it ran to its last checkpoint}. `folder` ("" for this process only) keeps each as
  FINGERPRINT.json. Processes may share a folder: each write goes through its own temporary file and replaces
  the entry whole, never with less than the folder holds (a search is deterministic, so the entry that got
  further holds the other)."""

  def __init__(self, folder: str = ""):
    self.folder = folder
    self._entries: dict[str, dict] = {}

  def _path(self, key: str) -> str:
    return os.path.join(self.folder, f"{key}.json")

  def _read(self, key: str) -> dict | None:
    try:
      with open(self._path(key)) as f:
        return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):  # none, or left unreadable by something else: search again
      return None

  def get(self, key: str) -> dict | None:
    """The entry, as far as this process or (with a folder) any other got."""
    if self.folder:
      on_disk = self._read(key)
      if on_disk is not None:
        self._entries[key] = _longer(self._entries.get(key), on_disk)
    return self._entries.get(key)

  def put(self, key: str, entry: dict) -> None:
    if self.folder:
      os.makedirs(self.folder, exist_ok=True)
      entry = _longer(self._read(key), entry)
      fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{key[:16]}", suffix=".tmp")
      with os.fdopen(fd, "w") as f:
        json.dump(entry, f)
      os.replace(tmp, self._path(key))
    self._entries[key] = entry

  def all_at_once(self, key: str, compute: Callable[[], Found]) -> Iterator[tuple[int, str]]:
    """A search that runs to its last checkpoint in one call (Ring-A-Bell's): computed once, then replayed."""
    entry = self.get(key)
    if entry is None:
      entry = {"found": [list(c) for c in compute()], "state": None, "done": True}
      self.put(key, entry)
    for budget, text in entry["found"]:
      yield int(budget), text

  def step_by_step(self, key: str, run: Callable[[Any], Iterator[tuple[int, str, Any]]]) -> Iterator[tuple[int, str]]:
    """A search that yields (budget, text, state) at each checkpoint as it reaches it (MMA's): `run(state)` goes
    on from a remembered state (None: from the start). What was found is replayed first; the search continues
    only if the caller asks for more, from as far as any process has got by then, and each new checkpoint is
    remembered before it is handed on."""
    entry = self.get(key) or {"found": [], "state": None, "done": False}
    for budget, text in list(entry["found"]):
      yield int(budget), text
    replayed = len(entry["found"])
    entry = self.get(key) or entry  # another process may have gone further meanwhile
    for budget, text in entry["found"][replayed:]:
      yield int(budget), text
    if entry["done"]:
      return
    for budget, text, state in run(entry["state"]):
      entry = {"found": [*entry["found"], [budget, text]], "state": state, "done": False}
      self.put(key, entry)
      yield budget, text
    self.put(key, {**entry, "done": True})


def check_folder(folder: str) -> None:
  """`evaluation.search_cache`, refused before any work where it cannot hold the searches."""
  if folder and os.path.exists(folder) and not os.path.isdir(folder):
    raise ConfigError(f"config.evaluation.search_cache={folder!r} is a file; expected a folder (or '' for none)")
  if folder and not os.access(_existing_parent(folder), os.W_OK):
    raise ConfigError(f"config.evaluation.search_cache={folder!r}: {_existing_parent(folder)} is not writable")


def _existing_parent(folder: str) -> str:
  folder = os.path.abspath(folder)
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  return folder


_CACHES: dict[str, SearchCache] = {}


def for_folder(folder: str) -> SearchCache:
  """The process's cache for `folder` ("" for memory only): one per folder, so every evaluation in a process
  shares what the others found."""
  folder = os.path.abspath(folder) if folder else ""
  if folder not in _CACHES:
    _CACHES[folder] = SearchCache(folder)
  return _CACHES[folder]

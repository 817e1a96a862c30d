"""Reading PyTorch-format weight files into numpy and writing model folders atomically.

safetensors are read with `safetensors.numpy` (no torch at run time). Pickled `.bin`/`.pt` files need torch
and are only ever opened with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from advunlearn_jax.errors import WeightsError


def cache_dir(name: str) -> str:
  """Where files derived once from downloads live: $ADVUNLEARN_CACHE, else $XDG_CACHE_HOME/advunlearn_jax."""
  root = os.environ.get("ADVUNLEARN_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "advunlearn_jax"
  )
  return os.path.join(root, name)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises its own error types for truncated or foreign files
    raise WeightsError(f"{path}: cannot read as safetensors ({e})") from e


def read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  """A `torch.save`d state dict, loaded with `weights_only=True` (never arbitrary pickles)."""
  try:
    import torch
  except ImportError as e:
    raise WeightsError(
      f"{path}: reading PyTorch pickles needs torch (pip install torch), or convert it to safetensors"
    ) from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise WeightsError(f"{path}: {_refusal(e)}") from e
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise WeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
  return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def _index_shards(index: str) -> list[str]:
  """The shard files a `*.safetensors.index.json` names, each inside the index's own folder: an index is data
  from wherever the folder came from, and a name such as ../../x.safetensors must not make us read elsewhere."""
  folder = os.path.realpath(os.path.dirname(index))
  try:
    with open(index) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise WeightsError(f"{index}: not a safetensors index (expected a 'weight_map' of tensor -> shard file)") from e
  paths = []
  for name in names:
    path = os.path.realpath(os.path.join(folder, str(name)))
    if os.path.dirname(path) != folder:
      raise WeightsError(f"{index}: shard {name!r} lies outside {folder}; refused")
    paths.append(path)
  return paths


def _refusal(e: Exception) -> str:
  """One line on why torch refused a file, without torch's advice to load it with weights_only=False (which
  would run whatever the pickle holds)."""
  import re

  text = str(e)
  called = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text, re.IGNORECASE)
  if called:
    return (
      f"refused: the pickle calls {called.group(1)}, which a tensor state dict never needs (only tensors are "
      "read from .pt/.bin/.pth files); convert the file to safetensors with a tool you trust"
    )
  opcode = re.search(r"Unsupported operand (\d+)", text)
  if opcode:
    return f"not a PyTorch state dict (pickle opcode {opcode.group(1)} is none a tensor file holds)"
  lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln and "issue" not in ln]
  return f"not a readable PyTorch state dict ({type(e).__name__}: {(lines or [''])[0][:200]})"


def read_weights_folder(folder: str, stems: Sequence[str]) -> tuple[dict[str, np.ndarray], str]:
  """Reads `<stem>.safetensors` (or its sharded index), else `<stem>.bin`, for the first stem present.

  Returns the flat state dict and the path it came from (for error messages).
  """
  for stem in stems:
    single = os.path.join(folder, f"{stem}.safetensors")
    if os.path.isfile(single):
      return read_safetensors(single), single
    index = single + ".index.json"
    if os.path.isfile(index):
      state = {}
      for shard in _index_shards(index):
        state.update(read_safetensors(shard))
      return state, index
  for stem in stems:
    pickle = os.path.join(folder, f"{stem}.bin")
    if os.path.isfile(pickle):
      return read_torch_pickle(pickle), pickle
  wanted = ", ".join(f"{s}.safetensors" for s in stems)
  raise WeightsError(f"{folder}: no weights found (looked for {wanted} or .bin)")


@contextlib.contextmanager
def atomic_folder(out_dir: str, overwrite: bool = True, keep: tuple[str, ...] = ()) -> Iterator[str]:
  """Yields a staging folder that replaces `out_dir` only if the block finishes without error. `keep`: entries of
  the replaced folder that the new one takes over (a clone's `.git`; a lock file, hard-linked before the swap so
  that its path never names another file while held)."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    yield staging
    if os.path.exists(out_dir):
      _link_files(out_dir, staging, keep)
      backup = staging + ".old"
      os.rename(out_dir, backup)
      os.rename(staging, out_dir)
      for name in keep:  # folders, and files that could not be linked; a crash here leaves them in the backup
        if os.path.lexists(os.path.join(backup, name)) and not os.path.lexists(os.path.join(out_dir, name)):
          os.rename(os.path.join(backup, name), os.path.join(out_dir, name))
      shutil.rmtree(backup)
    else:
      os.rename(staging, out_dir)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)


def _link_files(source: str, target: str, names: tuple[str, ...]) -> None:
  for name in names:
    path = os.path.join(source, name)
    if os.path.isfile(path) and not os.path.islink(path):
      try:
        os.link(path, os.path.join(target, name))
      except OSError:  # no hard links here, or the name is taken: moved after the swap instead
        pass


def write_safetensors(path: str, state: dict[str, np.ndarray]) -> None:
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path, metadata={"format": "pt"})


def write_json(path: str, obj: dict) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")

"""Strict, mechanical mapping between PyTorch state dicts and Flax parameter trees.

Our Flax modules name parameters after the PyTorch module paths, so one rule covers every model:
  * a path component `<list>_<i>` is the `i`-th entry of a PyTorch `ModuleList` named `<list>` (only for
    the list names a model declares, because diffusers also has literal names such as `linear_1`);
  * Linear `weight` [out, in] <-> `kernel` [in, out]; Conv `weight` [O, I, kh, kw] <-> `kernel` [kh, kw, I, O];
    LayerNorm/GroupNorm `weight` <-> `scale`; Embedding `weight` <-> `embedding`; `bias` <-> `bias`.

The expected tree comes from `jax.eval_shape`, never from a random init, and any missing, unexpected or
mis-shaped key is an error that names the file and the key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from advunlearn_jax.errors import WeightsError

_INDEXED = re.compile(r"^(.+)_(\d+)$")


def torch_key(flax_path: tuple[str, ...], list_names: Collection[str]) -> str:
  """('encoder', 'layers_3', 'mlp', 'fc1', 'kernel') -> 'encoder.layers.3.mlp.fc1.weight'."""
  parts = []
  for component in flax_path[:-1]:
    m = _INDEXED.match(component)
    parts.extend([m.group(1), m.group(2)] if m and m.group(1) in list_names else [component])
  leaf = flax_path[-1]
  parts.append("bias" if leaf == "bias" else "weight")
  return ".".join(parts)


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
  return value


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
  return value


def _expected_torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_torch(leaf, np.empty(shape, dtype=np.uint8)).shape


def key_table(abstract: Any, list_names: Collection[str]) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """PyTorch key -> (Flax path, expected PyTorch shape), for every leaf of an abstract param tree."""
  table = {}
  for path, leaf in traverse_util.flatten_dict(_unfreeze(abstract)).items():
    key = torch_key(path, list_names)
    if key in table:
      raise AssertionError(f"two Flax leaves map to the PyTorch key {key!r}: {table[key][0]} and {path}")
    table[key] = (path, _expected_torch_shape(path[-1], tuple(leaf.shape)))
  return table


def torch_to_flax(
  state: Mapping[str, np.ndarray],
  abstract: Any,
  *,
  list_names: Collection[str],
  source: str,
  ignore: Callable[[str], bool] = lambda key: False,
  dtype: Any = np.float32,
  display_prefix: str = "",
) -> dict[str, Any]:
  """Builds the Flax tree of `abstract` from a flat PyTorch state dict, failing on any mismatch.

  `display_prefix` is prepended to key names in error messages: the prefix the file itself uses.
  """
  table = key_table(abstract, list_names)
  check_keys(table, state, f"{source}: weights do not match the model config.", ignore, display_prefix)
  flat = {}
  for key, (path, torch_shape) in table.items():
    value = np.asarray(state[key])
    if tuple(value.shape) != torch_shape:
      raise WeightsError(
        f"{source}: key {display_prefix + key!r} has shape {tuple(value.shape)}, the config expects {torch_shape}"
      )
    flat[path] = np.ascontiguousarray(_to_flax(path[-1], value)).astype(dtype, copy=False)
  return traverse_util.unflatten_dict(flat)


def check_keys(
  expected: Collection[str],
  present: Collection[str],
  headline: str,
  ignore: Callable[[str], bool] = lambda key: False,
  display_prefix: str = "",
) -> None:
  """A WeightsError starting with `headline` that lists the missing and unexpected keys, if there are any."""
  missing = sorted(display_prefix + k for k in expected if k not in present)
  unexpected = sorted(display_prefix + k for k in present if k not in expected and not ignore(k))
  if missing or unexpected:
    lines = [headline]
    if missing:
      lines.append(f"  missing {len(missing)} key(s): {_preview(missing)}")
    if unexpected:
      lines.append(f"  unexpected {len(unexpected)} key(s): {_preview(unexpected)}")
    raise WeightsError("\n".join(lines))


def flax_to_torch(params: Any, *, list_names: Collection[str], prefix: str = "") -> dict[str, np.ndarray]:
  """The flat PyTorch state dict (float32 numpy, contiguous) of a Flax parameter tree."""
  out = {}
  for path, leaf in traverse_util.flatten_dict(_unfreeze(params)).items():
    value = np.asarray(jax.device_get(leaf), dtype=np.float32)
    out[prefix + torch_key(path, list_names)] = np.ascontiguousarray(_to_torch(path[-1], value))
  return out


def _unfreeze(tree: Any) -> Any:
  return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


def _preview(keys: list[str], n: int = 8) -> str:
  shown = ", ".join(keys[:n])
  return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")

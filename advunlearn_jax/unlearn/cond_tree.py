"""Row operations on a UNet conditioning: SD's context array [B, T, D] or SDXL's `SDXLCond` pytree, whose leaves
all lead with the batch axis. On a bare array each is the array operation itself, so SD's step is unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


def take(cond: Any, index: Any) -> Any:
  return jax.tree.map(lambda a: a[index], cond)


def concat(conds: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *a: jnp.concatenate(a), *conds)


def repeat(cond: Any, n: int) -> Any:
  return jax.tree.map(lambda a: jnp.repeat(a, n, axis=0), cond)


def rows(cond: Any) -> int:
  return jax.tree.leaves(cond)[0].shape[0]


def broadcast(single: Any, n: int) -> Any:
  """One unbatched conditioning (leaves without the batch axis) as n rows."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), single)


def broadcast_like(single: Any, like: Any) -> Any:
  """`single` (unbatched) as many rows as `like` has."""
  return broadcast(single, rows(like))

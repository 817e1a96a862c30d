"""Device mesh and batch sharding. Parameters are replicated; batches are split over the `data` axis."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def data_mesh(devices: list | None = None) -> Mesh:
  return Mesh(np.asarray(devices or jax.devices()), (DATA,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def constrain_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Splits the leading (batch) axis over `data` when it divides evenly; otherwise leaves it replicated
  (the reference's concept batch of 1 cannot be split)."""
  if mesh is None or mesh.shape[DATA] == 1 or x.shape[0] % mesh.shape[DATA]:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(DATA)))

"""Device mesh and shardings: batches split over every mesh axis, parameters sharded over `fsdp` (or replicated).

The mesh has two axes: `data` and `fsdp`. Batches are split over both (each device gets its own rows).
Parameters and their Adam state follow one rule (`param_spec`): a tensor of at least `min_size` elements is split
along its largest dimension that `fsdp` divides, everything else is replicated; XLA all-gathers a layer's
weights where it runs and reduce-scatters its gradients. With fsdp = 1 (the default for text-encoder methods,
whose trained tower is small) this is plain data parallelism.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from advunlearn_jax.errors import ConfigError

DATA, FSDP = "data", "fsdp"
# Below this many elements a tensor stays replicated: biases and norms cost more in collectives than in memory.
MIN_SHARDED_SIZE = 2**14


def make_mesh(devices: list | None = None, fsdp: int = 1) -> Mesh:
  devices = list(devices or jax.devices())
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"fsdp={fsdp} must divide the {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), (DATA, FSDP))


def fsdp_size(requested: int, tower: str, devices: list | None = None) -> int:
  """How many devices share each parameter: `requested` (config.mesh.fsdp) when set, else 1 (data parallel) for
  a text-encoder method, whose trained tower is small, and for a UNet method every device of a host (the fast
  links). `devices` may be another machine's (an ahead-of-time compile for a TPU slice): a host's devices are
  those of one process index."""
  devices = list(devices or jax.devices())
  n = len(devices)
  if requested:
    if n % requested:
      raise ConfigError(f"config.mesh.fsdp={requested} does not divide the {n} devices")
    return requested
  if tower == "text_encoder":
    return 1
  per_host = sum(d.process_index == devices[0].process_index for d in devices)
  return math.gcd(n, per_host)


def _fsdp_of(mesh: Mesh | None) -> int:
  return mesh.shape.get(FSDP, 1) if mesh is not None else 1


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  n = _fsdp_of(mesh)
  if n == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return PartitionSpec()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):  # the largest dimension that divides
    if shape[axis] % n == 0:
      # No trailing Nones: jit reports output shardings that way, and an input spec spelled differently would
      # miss the dispatch cache on the next step.
      return PartitionSpec(*(FSDP if a == axis else None for a in range(axis + 1)))
  return PartitionSpec()


def bytes_per_device(tree: Any, mesh: Mesh) -> int:
  """What `shard_params` would place on each device, in bytes; leaves may be abstract (jax.ShapeDtypeStruct),
  so a layout can be sized for weights that do not fit here."""
  total = 0
  for x in jax.tree.leaves(tree):
    spec = param_spec(tuple(x.shape), mesh)
    split = math.prod(mesh.shape[entry] for entry in spec if entry is not None)
    total += math.prod(x.shape) * np.dtype(x.dtype).itemsize // split
  return total


def _put(x, sharding):
  """device_put that also places typed PRNG keys (as their key data) on other processes' devices."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
  return jax.device_put(x, sharding)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every leaf on every device of `mesh`. Host values must be equal on all processes (they are: seeded)."""
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: _put(x, sharding), tree)


def shard_params(tree: Any, mesh: Mesh) -> Any:
  """Parameters (or optimiser state shaped like them) placed by `param_spec`."""
  return jax.tree.map(lambda x: _put(x, NamedSharding(mesh, param_spec(np.shape(x), mesh))), tree)


def abstract(tree: Any, mesh: Mesh, sharded: bool) -> Any:
  """The shapes of `tree` placed as `shard_params` (sharded) or `replicate` would place them, holding no data:
  the inputs of an ahead-of-time compilation for a mesh of devices this host need not have."""
  place = lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), mesh) if sharded else PartitionSpec())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place(x)), tree)


def constrain_params(tree: Any, mesh: Mesh | None) -> Any:
  """Inside jit: keeps updated parameters on `param_spec`'s layout, so each step's outputs have the same
  shardings as its inputs (otherwise the next step would compile again for the compiler's choice)."""
  if _fsdp_of(mesh) == 1:
    return tree
  return jax.tree.map(
    lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, param_spec(x.shape, mesh))), tree
  )


def constrain_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Splits the leading (batch) axis over every mesh axis when it divides evenly, else over `data` alone, else
  leaves it replicated (the reference's concept batch of 1 cannot be split)."""
  if mesh is None or mesh.size == 1:
    return x
  for axes in ((DATA, FSDP), (DATA,)):
    size = math.prod(mesh.shape[a] for a in axes)
    if size > 1 and x.shape[0] % size == 0:
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(axes)))
  return x


def sharded_fraction(tree: Any) -> float:
  """The fraction of the tree's elements that live split over `fsdp` (0.0 when everything is replicated)."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and x.size]
  total = sum(x.size for x in leaves)
  split = sum(x.size for x in leaves if isinstance(x.sharding, NamedSharding) and _uses_fsdp(x.sharding.spec))
  return split / max(total, 1)


def _uses_fsdp(spec: PartitionSpec) -> bool:
  return any(entry == FSDP or (isinstance(entry, tuple) and FSDP in entry) for entry in spec)

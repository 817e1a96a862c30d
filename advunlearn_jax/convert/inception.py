"""pytorch-fid's FID Inception weights -> the Flax variables of `models.inception.FIDInceptionV3`.

  python -m advunlearn_jax.tools.fetch_inception [--pth=pt_inception-2015-12-05-6726825d.pth] [--out=FILE]

Without `--pth` the file is downloaded once from pytorch-fid's release (`FID_WEIGHTS_URL`) and its SHA-256
checked against the prefix in its name. Reading the `.pth` needs torch, once: the output is a safetensors file
with the same keys, which later runs (TPU VMs without torch included) read directly. By default it goes to the
cache (`cached_path()`), where `evaluation.fid` finds it.

The key set is strict: pytorch-fid's network is torchvision's Inception3 with 1008 classes and no auxiliary
head, loaded with a strict `load_state_dict`, so its file holds exactly the conv and BatchNorm tensors of
every block plus `fc.weight` / `fc.bias` (unused for FID, but required so a different Inception file is
refused). `num_batches_tracked` counters, present or not, carry nothing for inference.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from advunlearn_jax.convert import torch_layout, weights_io
from advunlearn_jax.errors import WeightsError
from advunlearn_jax.models.inception import INPUT_SIZE, FIDInceptionV3

FID_WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
_SHA256_PREFIX = "6726825d"
CACHE_FILE = "pt_inception-2015-12-05.safetensors"
_CLASSIFIER = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
_OPTIONAL_SUFFIX = ".num_batches_tracked"
# (Flax collection, leaf) -> PyTorch leaf name of the conv or BatchNorm module.
_LEAVES = {
  ("params", "kernel"): "weight",
  ("params", "scale"): "weight",
  ("params", "bias"): "bias",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}


def key_table() -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """PyTorch key -> (Flax path with its collection first, PyTorch shape), for every variable of the network."""
  abstract = jax.eval_shape(
    FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  )
  table = {}
  for path, leaf in traverse_util.flatten_dict(dict(abstract)).items():
    collection, *modules, name = path
    shape = tuple(leaf.shape)
    if name == "kernel":  # HWIO -> OIHW
      shape = (shape[3], shape[2], shape[0], shape[1])
    table[".".join([*modules, _LEAVES[(collection, name)]])] = (path, shape)
  return table


def expected_keys() -> dict[str, tuple[int, ...]]:
  """Every key of pytorch-fid's weight file (bar `num_batches_tracked`) with its shape."""
  return {**{k: shape for k, (_, shape) in key_table().items()}, **_CLASSIFIER}


def to_flax(state: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
  """{'params': ..., 'batch_stats': ...} from pytorch-fid's state dict; any missing, unexpected or mis-shaped
  key is a WeightsError naming `source` and the key."""
  expected = expected_keys()
  headline = f"{source}: not pytorch-fid's FID Inception weights ({FID_WEIGHTS_URL.rsplit('/', 1)[1]})."
  torch_layout.check_keys(expected, state, headline, ignore=lambda k: k.endswith(_OPTIONAL_SUFFIX))
  for key, shape in expected.items():
    if tuple(np.shape(state[key])) != shape:
      raise WeightsError(f"{source}: key {key!r} has shape {tuple(np.shape(state[key]))}, expected {shape}")
  flat = {}
  for key, (path, _) in key_table().items():
    value = np.asarray(state[key], np.float32)
    flat[path] = np.ascontiguousarray(value.transpose(2, 3, 1, 0) if value.ndim == 4 else value)
  return traverse_util.unflatten_dict(flat)


def read(path: str) -> dict[str, np.ndarray]:
  """A converted `.safetensors` (no torch needed) or pytorch-fid's original `.pth` (needs torch)."""
  if not os.path.isfile(path):
    raise WeightsError(f"Inception weights {path!r} do not exist")
  if path.endswith(".safetensors"):
    return weights_io.read_safetensors(path)
  return weights_io.read_torch_pickle(path)


def load_variables(path: str) -> dict[str, Any]:
  return to_flax(read(path), path)


def cached_path() -> str:
  return os.path.join(weights_io.cache_dir("fid_inception"), CACHE_FILE)


def convert(pth: str, out: str) -> str:
  """Checks `pth` key by key and writes its tensors (without `num_batches_tracked`) to `out` atomically."""
  state = read(pth)
  to_flax(state, pth)
  keep = {k: np.asarray(v, np.float32) for k, v in state.items() if not k.endswith(_OPTIONAL_SUFFIX)}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fd, staging = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)), suffix=".partial")
  os.close(fd)
  try:
    weights_io.write_safetensors(staging, keep)
    os.chmod(staging, 0o644)  # mkstemp's 0600 would keep the shared cache from other users
    os.replace(staging, out)
  finally:
    if os.path.exists(staging):
      os.remove(staging)
  return out


def download(dest_dir: str, url: str = FID_WEIGHTS_URL, timeout: float = 60.0) -> str:
  """pytorch-fid's `.pth` into `dest_dir`, verified against the SHA-256 prefix in its file name."""
  os.makedirs(dest_dir, exist_ok=True)
  path = os.path.join(dest_dir, url.rsplit("/", 1)[1])
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path + ".partial", "wb") as f:
      while chunk := response.read(1 << 20):
        digest.update(chunk)
        f.write(chunk)
  except OSError as e:
    raise WeightsError(
      f"could not download {url} ({e}); download it elsewhere and pass its path (evaluation.inception_weights)"
    ) from e
  if not digest.hexdigest().startswith(_SHA256_PREFIX):
    os.remove(path + ".partial")
    raise WeightsError(f"{url}: SHA-256 {digest.hexdigest()[:16]}... does not start with {_SHA256_PREFIX}")
  os.replace(path + ".partial", path)
  return path


def download_and_convert(out: str | None = None) -> str:
  out = out or cached_path()
  with tempfile.TemporaryDirectory() as tmp:
    return convert(download(tmp), out)

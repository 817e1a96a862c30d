"""One image per caption for the utility metrics (COCO-10k in the paper): sharded, batched, resumable.

Captions are cut into global batches of `per_device_batch x devices` consecutive captions that share a guidance
scale; each batch is split over every device of the mesh (the text encoder, UNet and VAE replicated), denoised
with batched classifier-free guidance, decoded on device, and every process writes the rows its devices hold.
Each caption's start latents come from its own seed, so an image does not depend on the batch it fell in, the
device count or the resume point. A store that already holds an image never makes it again: a preempted
10k-image run continues where it stopped.

Stores: `png` writes `{index:05d}.png` (atomically: a file that exists is complete), `npy` one
`images.npy` [N, H, W, 3] uint8 plus `done.npy`, the mask of finished rows, written after the rows (one host).
`manifest.json` records the captions and sampler; a folder made for other captions or settings is refused.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from advunlearn_jax import sharding
from advunlearn_jax.data.lazy_images import LazyImages, read_rgb
from advunlearn_jax.diffusion import generation
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals.prompt_sets import EvalPrompt
from advunlearn_jax.models.pipeline_record import Pipeline

FORMATS = ("png", "npy")
_MANIFEST = "manifest.json"


class ImageStore:
  """The images of `n` captions in `folder`, in one of `FORMATS`; `done()` says which exist."""

  def __init__(self, folder: str, manifest: dict, image_shape: tuple[int, int, int], fmt: str = "png"):
    if fmt not in FORMATS:
      raise ConfigError(f"config.evaluation.utility_format is {fmt!r}; expected one of {list(FORMATS)}")
    self.folder, self.fmt, self.n = folder, fmt, len(manifest["captions"])
    self.image_shape = tuple(image_shape)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, _MANIFEST)
    if os.path.exists(path):
      with open(path) as f:
        previous = json.load(f)
      if previous != manifest:
        changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
        raise ConfigError(
          f"{folder} holds images made with other {', '.join(changed) or 'settings'}; "
          "pick another output folder or delete this one"
        )
    elif jax.process_index() == 0:
      with open(path + ".tmp", "w") as f:
        json.dump(manifest, f)
      os.replace(path + ".tmp", path)
    if fmt == "npy":
      self._array_path = os.path.join(folder, "images.npy")
      self._done_path = os.path.join(folder, "done.npy")
      mode = "r+" if os.path.exists(self._array_path) else "w+"
      self._array = np.lib.format.open_memmap(self._array_path, mode, np.uint8, (self.n, *self.image_shape))
      self._done = np.load(self._done_path) if os.path.exists(self._done_path) else np.zeros(self.n, bool)

  def _png(self, index: int) -> str:
    return os.path.join(self.folder, f"{index:05d}.png")

  def done(self) -> np.ndarray:
    if self.fmt == "npy":
      return self._done.copy()
    return np.array([os.path.exists(self._png(i)) for i in range(self.n)])

  def write(self, rows: dict[int, np.ndarray]) -> None:
    if self.fmt == "npy":
      for i, image in rows.items():
        self._array[i] = image
      self._array.flush()
      self._done[list(rows)] = True
      np.save(self._done_path + ".tmp.npy", self._done)
      os.replace(self._done_path + ".tmp.npy", self._done_path)
      return
    for i, image in rows.items():
      staging = self._png(i) + ".tmp.png"
      generation.save_png(staging, image)
      os.replace(staging, self._png(i))

  def images(self) -> LazyImages:
    """Every caption's image, read when indexed (a ConfigError if any is missing)."""
    missing = np.flatnonzero(~self.done())
    if len(missing):
      raise ConfigError(f"{self.folder}: {len(missing)} of {self.n} images missing (first: index {missing[0]})")
    if self.fmt == "npy":
      return LazyImages(self.n, lambda i: np.asarray(self._array[i]))
    return LazyImages(self.n, lambda i: read_rgb(self._png(i)))


def manifest(captions: Sequence[EvalPrompt], scheduler: str, steps: int, latents: str) -> dict:
  return {
    "captions": [[c.prompt, c.seed, c.guidance] for c in captions],
    "scheduler": scheduler,
    "steps": steps,
    "latents": latents,
  }


def _batches(pending: Sequence[int], captions: Sequence[EvalPrompt], size: int) -> list[list[int]]:
  """Runs of pending captions with one guidance scale, cut into batches of at most `size`."""
  out = []
  for _, run in itertools.groupby(pending, key=lambda i: captions[i].guidance):
    run = list(run)
    out += [run[k : k + size] for k in range(0, len(run), size)]
  return out


def generate(
  pipe: Pipeline,
  captions: Sequence[EvalPrompt],
  store: ImageStore,
  *,
  scheduler: str,
  steps: int,
  latents: str = "jax",
  per_device_batch: int = 4,
  mesh: Mesh | None = None,
  progress: bool = True,
  log=print,
) -> int:
  """Makes every image the store lacks; returns how many it made."""
  mesh = mesh or sharding.make_mesh()
  pending = [int(i) for i in np.flatnonzero(~store.done())]
  if len(pending) < store.n:
    log(f"{store.folder}: {store.n - len(pending)} of {store.n} images already there; making the other {len(pending)}")
  if not pending:
    return 0
  batch_size = per_device_batch * mesh.size
  rows = NamedSharding(mesh, PartitionSpec(mesh.axis_names))  # the batch axis over every device
  fields = [f for f in ("text_params", "text_params_2") if f in pipe._fields]  # SDXL: both towers
  towers = {f: sharding.replicate(getattr(pipe, f), mesh) for f in fields}
  replicated = pipe._replace(
    unet_params=sharding.replicate(pipe.unet_params, mesh),
    vae_params=sharding.replicate(pipe.vae_params, mesh),
    **towers,
  )
  uncond = jax.device_put(generation.unconditional(replicated, batch_size), rows)  # SDXL: its zeros where forced
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc="utility images", unit="img")
  for batch in _batches(pending, captions, batch_size):
    padded = batch + [batch[-1]] * (batch_size - len(batch))  # the last batch repeats its last caption
    start = np.concatenate([np.asarray(generation.initial_latents(pipe, 1, captions[i].seed, latents)) for i in padded])
    cond = generation.encode_prompts(replicated, [captions[i].prompt for i in padded])
    out = generation.denoise_latents(
      replicated,
      jax.device_put(cond, rows),
      uncond,
      jax.device_put(start, rows),
      scheduler=scheduler,
      steps=steps,
      guidance=captions[batch[0]].guidance,
    )
    images = generation.decode_uint8(replicated.vae_config, replicated.vae_params, out)
    mine = {}
    for shard in images.addressable_shards:
      first = shard.index[0].start or 0
      for offset, image in enumerate(np.asarray(shard.data)):
        if first + offset < len(batch):
          mine[batch[first + offset]] = image
    store.write(mine)
    if bar is not None:
      bar.update(len(batch))
  if bar is not None:
    bar.close()
  return len(pending)

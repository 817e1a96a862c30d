"""Image sets read one image at a time: the utility metrics walk 10k images in chunks, so none of them holds
every image in memory (10k generated images at 512 px are 7.9 GB, COCO's real ones more)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class LazyImages(Sequence):
  """`n` uint8 RGB images, image `i` made by `load(i)` whenever it is indexed; a slice is a list of them."""

  def __init__(self, n: int, load: Callable[[int], np.ndarray]):
    self._n, self._load = n, load

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self._load(i) for i in range(*index.indices(self._n))]
    if not -self._n <= index < self._n:
      raise IndexError(f"image {index} of {self._n}")
    return self._load(index % self._n)


def read_rgb(path: str) -> np.ndarray:
  from PIL import Image

  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))

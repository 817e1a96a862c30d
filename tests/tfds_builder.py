"""A small local tfds dataset shaped like `coco_captions` (an `image` and a sequence of `captions/text`),
built offline into array_record files, for the `tfds:` sources (data/tfds_source.py). Images are given to the
builder as PIL images, which tfds encodes without TensorFlow."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = "tiny_captions"
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def caption(i: int) -> str:
  return f"a photo of a {COLOURS[i % len(COLOURS)]} square number {i}"


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  N = {"train": 12, "val": 6}

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(None, None, 3)),
          "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
          "id": np.int64,
        }
      ),
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self.N}

  def _generate_examples(self, split):
    from PIL import Image

    rng = np.random.default_rng(len(split))
    for i in range(self.N[split]):
      h, w = (24, 32) if i % 2 else (40, 28)  # mixed sizes, as COCO's
      image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      yield i, {"image": Image.fromarray(image), "captions": {"text": [caption(i), f"alt {i}"]}, "id": i}


def build(data_dir: str) -> str:
  TinyCaptions(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir

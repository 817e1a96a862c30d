"""Captions and images from TensorFlow Datasets, without TensorFlow: `tfds:NAME[/CONFIG]:SPLIT`.

  evaluation.captions = "tfds:coco_captions/2014:val"      # one caption per example (the first)
  evaluation.real_images = "tfds:coco_captions/2014:val"   # the `image` feature
  retain.dataset = "tfds:coco_captions/2014:train"         # captions as retain prompts

Reads go through `tfds.data_source` (random access over array_record files, decoded with numpy and PIL), so
nothing here imports TensorFlow. The dataset must be prepared once, in array_record format:

  pip install tensorflow-datasets && tfds build coco_captions/2014 --file_format=array_record

(building COCO needs TensorFlow on the machine that builds it, not on the one that reads it). The data dir is
$TFDS_DATA_DIR, read at each call, else ~/tensorflow_datasets. Examples are taken in the split's stored order,
so `max_*` limits pick the same examples on every run and every host.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import numpy as np

from advunlearn_jax.data.lazy_images import LazyImages
from advunlearn_jax.errors import ConfigError

PREFIX = "tfds:"
_CAPTION_FEATURES = ("captions", "caption", "text")  # coco_captions, then single-caption datasets


class Spec(NamedTuple):
  name: str  # NAME or NAME/CONFIG, as tfds.builder takes it
  split: str


def is_tfds(source: str) -> bool:
  return source.startswith(PREFIX)


def parse(source: str, key: str) -> Spec:
  body = source[len(PREFIX) :]
  name, sep, split = body.rpartition(":")
  if not is_tfds(source) or not sep or not name or not split:
    raise ConfigError(
      f"config.{key} is {source!r}: expected tfds:NAME[/CONFIG]:SPLIT, e.g. tfds:coco_captions/2014:val"
    )
  return Spec(name, split)


def open_source(source: str, key: str, skip_images: bool = False) -> Any:
  """The `tfds.data_source` of `source` (with `skip_images`, the `image` feature left as encoded bytes); a
  ConfigError that says how to prepare it if it is not there."""
  spec = parse(source, key)
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ConfigError(f"config.{key}={source!r} needs tensorflow-datasets: pip install tensorflow-datasets") from e
  data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  try:
    data = tfds.data_source(spec.name, split=spec.split, data_dir=data_dir, download=False)
    if skip_images and "image" in data.dataset_info.features:
      skip = {"image": tfds.decode.SkipDecoding()}
      data = tfds.data_source(spec.name, split=spec.split, data_dir=data_dir, download=False, decoders=skip)
    return data
  except Exception as e:  # unknown name, unprepared dataset, missing split, other file format: all say so
    raise ConfigError(
      f"config.{key}={source!r}: cannot open {spec.name!r} split {spec.split!r} in {data_dir} "
      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it once with "
      f"`tfds build {spec.name} --file_format=array_record` (set TFDS_DATA_DIR to choose where)."
    ) from e


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _caption(example: dict, source: str, key: str) -> str:
  for feature in _CAPTION_FEATURES:
    value = example.get(feature)
    if isinstance(value, dict) and "text" in value:  # a Sequence({'text': ...}), as coco_captions
      value = value["text"]
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
      value = value[0]
    if isinstance(value, (bytes, str, np.bytes_, np.str_)) and _text(value).strip():
      return _text(value).strip()
  raise ConfigError(
    f"config.{key}={source!r}: an example has no caption; looked for features {list(_CAPTION_FEATURES)} "
    f"(a text or a sequence of {{'text': ...}}), found {sorted(example)}"
  )


def _take(source_obj: Any, limit: int) -> range:
  return range(min(len(source_obj), limit) if limit > 0 else len(source_obj))


@functools.lru_cache(maxsize=8)
def captions(source: str, key: str, limit: int = 0) -> tuple[str, ...]:
  """The first caption of each of the first `limit` examples (0: all); images are not decoded. Cached: a run
  reads its retain set once for the config check and once to train."""
  data = open_source(source, key, skip_images=True)
  return tuple(_caption(data[i], source, key) for i in _take(data, limit))


def images(source: str, key: str, limit: int = 0) -> LazyImages:
  """The `image` feature of each of the first `limit` examples (0: all), uint8 RGB [H, W, 3], decoded when
  indexed."""
  data = open_source(source, key)
  if len(data) and "image" not in data.dataset_info.features:
    found = sorted(data.dataset_info.features.keys())
    raise ConfigError(f"config.{key}={source!r}: examples have no 'image' feature; found {found}")

  def load(i: int) -> np.ndarray:
    image = np.asarray(data[i]["image"])
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1)  # grey COCO images, as PIL's convert("RGB")
    return image.astype(np.uint8)

  return LazyImages(len(_take(data, limit)), load)

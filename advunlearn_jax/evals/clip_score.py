"""CLIP score (spec 6.2): the mean cosine similarity between each image and its caption under CLIP ViT-B/32,
as the reference computes it ((sum of logits_per_image) / (100 N) for one image per prompt).

Our Flax text tower plus the Flax vision tower of models/clip_vision.py, weights from a transformers
`CLIPModel` folder (openai/clip-vit-base-patch32). Preprocessing is CLIPImageProcessor's: bicubic resize of
the shortest edge, centre crop, rescale, normalise, read from the folder's preprocessor_config.json.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advunlearn_jax.convert import clip_model as clip_convert
from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.models.clip_vision import CLIPModel

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class Preprocess:
  """CLIPImageProcessor's defaults, overridden by `preprocessor_config.json` when the folder has one."""

  def __init__(self, folder: str, image_size: int):
    raw = {}
    path = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(path):
      with open(path) as f:
        raw = json.load(f)
    size = raw.get("size", image_size)
    self.shortest = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
    crop = raw.get("crop_size", image_size)
    self.crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    self.mean = np.array(raw.get("image_mean", OPENAI_MEAN), np.float32)
    self.std = np.array(raw.get("image_std", OPENAI_STD), np.float32)

  def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """uint8 RGB images (an array, or a list of differently sized ones) -> normalised NHWC float32."""
    from PIL import Image

    out = []
    for image in images:
      image = np.asarray(image, np.uint8)
      h, w = image.shape[:2]
      s = self.shortest  # the short side becomes s exactly, the long side is truncated (as transformers)
      size = (int(s * w / h), s) if h <= w else (s, int(s * h / w))
      x = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
      ch, cw = self.crop
      top, left = (x.shape[0] - ch) // 2, (x.shape[1] - cw) // 2
      x = x[top : top + ch, left : left + cw].astype(np.float32) / 255.0
      out.append((x - self.mean) / self.std)
    return np.stack(out)


@functools.partial(jax.jit, static_argnums=0)
def _image_features(config, params, pixels):
  return CLIPModel(config).apply({"params": params}, pixels, method=CLIPModel.image_features)


@functools.partial(jax.jit, static_argnums=0)
def _cosines(config, params, ids, pixels):
  model = CLIPModel(config)
  text = model.apply({"params": params}, ids, method=CLIPModel.text_features)
  image = model.apply({"params": params}, pixels, method=CLIPModel.image_features)
  norm = lambda v: v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  return jnp.sum(norm(text) * norm(image), axis=-1)


class CLIPScorer:
  def __init__(self, folder: str):
    self.config, self.params = clip_convert.load_clip_model(folder)
    has_tokenizer = any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "tokenizer.json"))
    self.tokenizer = tok_lib.load_tokenizer(folder if has_tokenizer else None)
    self.preprocess = Preprocess(folder, self.config.vision.image_size)

  def cosines(self, images: Sequence[np.ndarray], captions: Sequence[str], chunk: int = 64) -> np.ndarray:
    """Per pair: cos(image embedding, caption embedding)."""
    if len(images) != len(captions):
      raise ValueError(f"{len(images)} images for {len(captions)} captions")
    out = []
    for i in range(0, len(images), chunk):
      ids = tok_lib.tokenize(self.tokenizer, list(captions[i : i + chunk]), self.config.text.max_position_embeddings)
      pixels = self.preprocess(images[i : i + chunk])
      out.append(np.asarray(_cosines(self.config, self.params, jnp.asarray(ids), jnp.asarray(pixels))))
    return np.concatenate(out)

  def image_features(self, images: Sequence[np.ndarray], chunk: int = 64) -> np.ndarray:
    """Projected image embeddings [N, projection_dim] (unnormalised): the features of FID-CLIP."""
    out = [
      np.asarray(_image_features(self.config, self.params, jnp.asarray(self.preprocess(images[i : i + chunk]))))
      for i in range(0, len(images), chunk)
    ]
    return np.concatenate(out)

  def score(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> float:
    return float(np.mean(self.cosines(images, captions)))

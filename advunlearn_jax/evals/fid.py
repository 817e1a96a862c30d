"""Fréchet distance between image sets: on the FID Inception's features (the paper's FID) or on CLIP's.

`InceptionFeatures` runs the FID Inception-v3 (`models/inception.py`, pytorch-fid's network and weights, converted
by `convert/inception.py`) on 299 x 299 inputs and takes its 2048-d pool features. Two preprocessings bring an
image to 299 x 299 (`evaluation.fid_preprocess`), done on the host so images of every size share one compiled
network:
* `t2ibenchmark` (the paper's): AdvUnlearn's `train-scripts/img_retain_eval.py` calls T2IBenchmark's
  `calculate_fid`, whose "clean" resizer (T2IBenchmark/utils/resizers.py, `build_resizer("clean")`) centre-crops
  to a square, resizes the uint8 image with PIL's bicubic filter (antialiased when it shrinks) and quantises to
  uint8 again, before ToTensor's /255 (feature_extractors/inceptionV3_feature_extractor.py);
* `pytorch_fid`: uint8 to [0, 1], then bilinear `F.interpolate(..., align_corners=False)` of the whole image.
On 512 px generations against COCO photographs the two give different numbers, so a report names its
preprocessing. `frechet_distance` is the formula both tools share, with their guard for singular covariance
products. Without Inception weights, `evaluation.fid="clip"` measures the same distance on CLIP ViT-B/32 image
features ("FID_CLIP", Kynkäänniemi et al., 2023): useful to compare models with each other, but not on the scale
of the paper's FID column.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from scipy import linalg

from advunlearn_jax.data.lazy_images import LazyImages, read_rgb
from advunlearn_jax.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FEATURES = ("auto", "inception", "clip")
PREPROCESSING = ("t2ibenchmark", "pytorch_fid")


def statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"need at least 2 feature vectors [N, D], got shape {features.shape}")
  return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), as pytorch-fid computes it."""
  diff = mu1 - mu2
  covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
  if not np.isfinite(covmean).all():  # singular product: offset both diagonals
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def open_images(source: str, key: str, limit: int = 0) -> LazyImages:
  """uint8 RGB images [H, W, 3], each at its own size and read when indexed, from a folder (sorted by name) or
  a `tfds:NAME[/CONFIG]:SPLIT` source (in stored order); `key` names the config field in errors."""
  from advunlearn_jax.data import tfds_source

  if tfds_source.is_tfds(source):
    images = tfds_source.images(source, key, limit)
  elif not os.path.isdir(source):
    raise ConfigError(f"config.{key}: image folder {source!r} does not exist")
  else:
    names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_SUFFIXES))[: limit or None]
    images = LazyImages(len(names), lambda i: read_rgb(os.path.join(source, names[i])))
  if not len(images):
    raise ConfigError(f"config.{key}={source!r}: no images ({', '.join(IMAGE_SUFFIXES)} files or tfds examples)")
  return images


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, C] float -> [size, size, C], exactly as PyTorch's bilinear `F.interpolate` with
  `align_corners=False` and no antialiasing (source index clamped at 0, neighbour clamped at the edge)."""

  def taps(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # PyTorch: float32 scale, then scale * (i + 0.5) - 0.5 as one fused multiply-add (a float32*float32
    # product is exact in float64, so this rounds once, as the FMA does): the same source coordinates bit for bit.
    centres = (np.arange(size, dtype=np.float32) + np.float32(0.5)).astype(np.float64)
    src = np.maximum((centres * np.float64(np.float32(n_in / size)) - 0.5).astype(np.float32), np.float32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, np.clip(src - lo, 0, 1).astype(np.float32)

  (r0, r1, wr), (c0, c1, wc) = taps(image.shape[0]), taps(image.shape[1])
  cols = image[:, c0] * (1 - wc)[None, :, None] + image[:, c1] * wc[None, :, None]  # PyTorch's order: width inner
  return cols[r0] * (1 - wr)[:, None, None] + cols[r1] * wr[:, None, None]


def crop_center(image: np.ndarray) -> np.ndarray:
  """The largest centred square, offsets rounded down (T2IBenchmark/utils/resizers.py, `crop_center`)."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return image[top : top + side, left : left + side]


def t2ibenchmark_input(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1], as T2IBenchmark's "clean" resizer and ToTensor."""
  from PIL import Image

  square = Image.fromarray(np.ascontiguousarray(crop_center(np.asarray(image, np.uint8))))
  resized = np.asarray(square.resize((size, size), resample=Image.BICUBIC)).clip(0, 255).astype(np.uint8)
  return resized.astype(np.float32) / 255.0


def pytorch_fid_input(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [size, size, 3] in [0, 1], as pytorch-fid (whole image, bilinear, no crop)."""
  return resize_bilinear(np.asarray(image, np.float32) / 255.0, size)


class InceptionFeatures:
  """The FID Inception's 2048-d features of uint8 RGB images of any size, `batch_size` at a time, after the
  `preprocess` of PREPROCESSING."""

  name = "inception"

  def __init__(self, weights: str, preprocess: str = "t2ibenchmark", batch_size: int = 50):
    from advunlearn_jax.convert import inception as convert
    from advunlearn_jax.models.inception import FIDInceptionV3

    check_preprocess(preprocess)
    self.weights = weights
    self.preprocess = preprocess
    self._input = t2ibenchmark_input if preprocess == "t2ibenchmark" else pytorch_fid_input
    self.batch_size = batch_size
    self._variables = jax.device_put(convert.load_variables(weights))
    self._apply = jax.jit(FIDInceptionV3().apply)

  def __call__(self, images) -> np.ndarray:
    from advunlearn_jax.models.inception import INPUT_SIZE

    out = []
    for start in range(0, len(images), self.batch_size):
      chunk = [self._input(im, INPUT_SIZE) for im in images[start : start + self.batch_size]]
      batch = np.zeros((self.batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.float32)  # one shape: one compilation
      batch[: len(chunk)] = np.stack(chunk)
      out.append(np.asarray(self._apply(self._variables, batch))[: len(chunk)])
    return np.concatenate(out)


class ClipFeatures:
  """CLIP image features for the Fréchet distance (FID_CLIP): comparable between models, not with the paper."""

  name = "clip"
  preprocess = "clip"  # the CLIP processor's own

  def __init__(self, scorer):
    self._scorer = scorer

  def __call__(self, images) -> np.ndarray:
    return self._scorer.image_features(images)


def check_preprocess(preprocess: str) -> None:
  if preprocess not in PREPROCESSING:
    raise ConfigError(f"config.evaluation.fid_preprocess is {preprocess!r}; expected one of {list(PREPROCESSING)}")


def feature_extractor(
  kind: str, inception_weights: str, clip_scorer=None, log=print, preprocess="t2ibenchmark", batch_size: int = 50
):
  """The features `evaluation.fid` asks for: `kind` in FEATURES, weights as `evaluation.inception_weights`,
  Inception inputs made as `evaluation.fid_preprocess`, `evaluation.fid_batch` at a time."""
  from advunlearn_jax.convert import inception as convert

  if kind not in FEATURES:
    raise ConfigError(f"config.evaluation.fid is {kind!r}; expected one of {list(FEATURES)}")
  if inception_weights and not os.path.isfile(inception_weights):
    raise ConfigError(f"config.evaluation.inception_weights: {inception_weights!r} does not exist")
  weights = inception_weights or (convert.cached_path() if os.path.isfile(convert.cached_path()) else "")
  how_to = f"`python -m advunlearn_jax.tools.fetch_inception` (downloads {convert.FID_WEIGHTS_URL} once)"
  if kind == "inception" and not weights:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
      raise ConfigError(
        f"config.evaluation.fid=inception: no weights at {convert.cached_path()} and HF_HUB_OFFLINE is set; run "
        f"{how_to} once online, or set evaluation.inception_weights to pytorch-fid's .pth"
      )
    log(f"fetching pytorch-fid's Inception weights into {convert.cached_path()}")
    weights = convert.download_and_convert()
  if weights and kind != "clip":
    return InceptionFeatures(weights, preprocess, batch_size)
  if clip_scorer is None:
    raise ConfigError(
      "config.evaluation.real_images: FID needs pytorch-fid's Inception weights (evaluation.inception_weights, "
      f"or the cache: {how_to}) or, for FID on CLIP features, evaluation.clip_model"
    )
  if kind == "auto":
    log(f"FID on CLIP features, not on the paper's scale: no Inception weights at {convert.cached_path()}; {how_to}")
  return ClipFeatures(clip_scorer)

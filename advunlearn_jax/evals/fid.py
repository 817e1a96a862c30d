"""Fréchet distance between image sets, on CLIP ViT-B/32 image features (FID-CLIP).

The paper's FID uses InceptionV3 features (T2IBenchmark / pytorch-fid). Every maintained FID package we
checked needs torchvision (pytorch-fid, clean-fid, torch-fidelity) or pins a CUDA or 2020-era stack (fidax,
jax-fid), so we compute the same Fréchet distance, with pytorch-fid's formula and its guard for singular
covariance products, on the features of the CLIP model we already load for the CLIP score (the "FID_CLIP"
of Kynkäänniemi et al., 2023). Its values are not on the Inception-FID scale: compare models with each
other, not with the paper's FID column.
"""

from __future__ import annotations

import os

import numpy as np
from scipy import linalg

from advunlearn_jax.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


def load_images(folder: str, limit: int = 0) -> list[np.ndarray]:
  """uint8 RGB images [H, W, 3] from a folder, sorted by name, each at its own size."""
  from PIL import Image

  if not os.path.isdir(folder):
    raise ConfigError(f"real-image folder {folder!r} does not exist")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
  if limit > 0:
    names = names[:limit]
  if len(names) < 2:
    raise ConfigError(f"{folder}: needs at least 2 images ({', '.join(IMAGE_SUFFIXES)}), found {len(names)}")
  return [np.asarray(Image.open(os.path.join(folder, name)).convert("RGB")) for name in names]

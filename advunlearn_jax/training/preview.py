"""Preview grids during training: the same prompts and initial latents under the original and the current
model, so erasure (concept row changes) and retention (retain rows stay) can be seen as the run goes.

Row 1 holds the original model's images, row 2 the current one's, one column per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from advunlearn_jax.diffusion import generation
from advunlearn_jax.models.pipeline_record import Pipeline


class Preview:
  def __init__(self, pipe: Pipeline, prompts: Sequence[str], *, seed: int, steps: int, guidance: float):
    if pipe.vae_params is None:
      raise ValueError("previews need a pipeline loaded with its VAE")
    self.pipe, self.prompts = pipe, list(prompts)
    self._kwargs = {"scheduler": "ddim", "steps": steps, "guidance": guidance}
    self._latents = generation.initial_latents(pipe, len(self.prompts), seed)
    self._original: np.ndarray | None = None

  def _images(self, text_params: Any = None, unet_params: Any = None) -> np.ndarray:
    pipe = self.pipe if unet_params is None else self.pipe._replace(unet_params=unet_params)
    return generation.generate(pipe, self.prompts, self._latents, text_params=text_params, **self._kwargs)

  def grid(self, text_params: Any = None, unet_params: Any = None) -> np.ndarray:
    """uint8 [2 H, n W, 3]: original (top) vs the given params (bottom)."""
    if self._original is None:
      self._original = self._images()
    current = self._images(text_params, unet_params)
    return generation.image_grid(np.concatenate([self._original, current]), cols=len(self.prompts))

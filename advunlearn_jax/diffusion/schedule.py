"""Noise schedules: the scaled-linear betas of Stable Diffusion, as ldm and diffusers each compute them."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from advunlearn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The fields of a diffusers `scheduler/scheduler_config.json` that our samplers use."""

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  prediction_type: str = "epsilon"

  @classmethod
  def from_dict(cls, raw: dict[str, Any], source: str = "scheduler config") -> ScheduleConfig:
    if raw.get("beta_schedule", "scaled_linear") not in ("scaled_linear", "linear"):
      raise ConfigError(
        f"{source}: key 'beta_schedule' = {raw['beta_schedule']!r}; supported: ['scaled_linear', 'linear']"
      )
    if raw.get("prediction_type", "epsilon") != "epsilon":
      raise ConfigError(
        f"{source}: key 'prediction_type' = {raw['prediction_type']!r}; only 'epsilon' models are supported"
      )
    if raw.get("trained_betas") is not None:
      raise ConfigError(f"{source}: key 'trained_betas' is not supported")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known and v is not None})

  @classmethod
  def from_json_file(cls, path: str) -> ScheduleConfig:
    if os.path.isdir(path):
      path = os.path.join(path, "scheduler_config.json")
    if not os.path.isfile(path):
      raise ConfigError(f"{path}: not found; a diffusers scheduler/ folder holds a scheduler_config.json")
    with open(path) as f:
      return cls.from_dict(json.load(f), source=path)

  def betas(self, dtype: Any) -> np.ndarray:
    n = self.num_train_timesteps
    if self.beta_schedule == "linear":
      return np.linspace(self.beta_start, self.beta_end, n, dtype=dtype)
    return np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=dtype) ** 2

  def alphas_cumprod_diffusers(self) -> np.ndarray:
    """float32 throughout, as diffusers' schedulers compute it."""
    return np.cumprod(1.0 - self.betas(np.float32), dtype=np.float32)

  def alphas_cumprod_ldm(self) -> np.ndarray:
    """float64, then stored as float32: ldm's `register_schedule`, which the reference's sampler reads."""
    return np.cumprod(1.0 - self.betas(np.float64)).astype(np.float32)

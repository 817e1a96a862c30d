"""What a loaded text-to-image pipeline is, in our types: the `Pipeline` record that convert/diffusers.py fills
and diffusion/ samples from, and its noise schedule (the scaled-linear betas of Stable Diffusion, as ldm and
diffusers each compute them). Both sit below convert/ and diffusion/, which each use them."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from advunlearn_jax.errors import ConfigError
from advunlearn_jax.models import hf_config
from advunlearn_jax.models.clip_text import CLIPTextConfig
from advunlearn_jax.models.unet import UNetConfig
from advunlearn_jax.models.vae import VAEConfig


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
  # DDIM only. diffusers' DDIMScheduler defaults to clipping x0_hat when a config (such as a PNDM one) is
  # silent; SD v1.x scheduler configs say false.
  clip_sample: bool = True
  clip_sample_range: float = 1.0

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
    raw, path = hf_config.read(path, "scheduler_config.json", "a diffusers scheduler/ folder")
    return cls.from_dict(raw, source=path)

  def betas(self, dtype: Any) -> np.ndarray:
    n = self.num_train_timesteps
    if dtype == np.float32:
      linspace = _torch_linspace_float32
    else:
      linspace = lambda a, b, n: np.linspace(a, b, n, dtype=np.float64)
    if self.beta_schedule == "linear":
      return linspace(self.beta_start, self.beta_end, n)
    return linspace(self.beta_start**0.5, self.beta_end**0.5, n) ** 2

  def alphas_cumprod_diffusers(self) -> np.ndarray:
    """Bit-identical to diffusers' schedulers on CPU: float32 betas, cumprod accumulated in float64."""
    return np.cumprod((1.0 - self.betas(np.float32)).astype(np.float64)).astype(np.float32)

  def alphas_cumprod_ldm(self) -> np.ndarray:
    """float64, then stored as float32: ldm's `register_schedule`, which the reference's sampler reads."""
    return np.cumprod(1.0 - self.betas(np.float64)).astype(np.float32)


def _torch_linspace_float32(start: float, end: float, n: int) -> np.ndarray:
  """`torch.linspace(..., dtype=float32)` exactly: float32 endpoints and step, each half filled from its end."""
  s, e = np.float32(start), np.float32(end)
  step = np.float64((e - s) / np.float32(n - 1))
  i = np.arange(n, dtype=np.float64)
  values = np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i))
  return values.astype(np.float32)


class Pipeline(NamedTuple):
  """A diffusers folder's weights and configs (convert/diffusers.load_pipeline)."""

  root: str
  unet_config: UNetConfig
  unet_params: Any
  vae_config: VAEConfig | None
  vae_params: Any
  text_config: CLIPTextConfig
  text_params: Any
  tokenizer_dir: str
  schedule: ScheduleConfig

  @property
  def text_tree(self) -> Any:
    """The text encoder's params as the training step holds them."""
    return self.text_params


class SDXLPipeline(NamedTuple):
  """A diffusers SDXL folder's weights and configs (convert/diffusers.load_sdxl_pipeline): the UNet conditions on
  both towers' penultimate states, concatenated, and on tower 2's `text_embeds` with the micro-conditioning ids."""

  root: str
  unet_config: UNetConfig
  unet_params: Any
  vae_config: VAEConfig | None
  vae_params: Any
  text_config: CLIPTextConfig  # text_encoder/: CLIP-L, a CLIPTextModel
  text_params: Any
  text_config_2: CLIPTextConfig  # text_encoder_2/: OpenCLIP bigG, a CLIPTextModelWithProjection
  text_params_2: Any
  tokenizer_dir: str
  tokenizer_2_dir: str
  schedule: ScheduleConfig
  # model_index.json's `force_zeros_for_empty_prompt` (diffusers' default True, as SDXL base says): CFG's
  # unconditional branch is all zeros (context and pooled embeddings) instead of the towers' encoding of "".
  force_zeros_for_empty_prompt: bool = True

  @property
  def text_tree(self) -> dict[str, Any]:
    """Both towers' params as the training step holds them (trainable.is_sdxl_text's tree)."""
    return {"text_encoder": self.text_params, "text_encoder_2": self.text_params_2}

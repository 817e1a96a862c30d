"""Small random PyTorch reference models (transformers/diffusers) and helpers to compare against them."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from advunlearn_jax.models.clip_text import CLIPTextConfig  # noqa: E402

# Small configs in the shape of the two towers Stable Diffusion uses. eos_token_id 2 is what SD's own
# text_encoder/config.json files hold (legacy pooling by argmax); the SD 1.x variant uses the modern value
# so that both pooling rules are exercised.
SD1_TINY = CLIPTextConfig(
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  hidden_act="quick_gelu",
  projection_dim=32,
  eos_token_id=49407,
)
SD2_TINY = CLIPTextConfig(
  hidden_size=48,
  intermediate_size=96,
  num_hidden_layers=3,
  num_attention_heads=3,
  hidden_act="gelu",
  projection_dim=32,
  eos_token_id=2,
  pad_token_id=1,
)
# Full-size towers (shapes only).
SD1_CLIP_L = CLIPTextConfig()
SD2_OPENCLIP_H = CLIPTextConfig(
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=23,
  num_attention_heads=16,
  hidden_act="gelu",
  projection_dim=512,
  eos_token_id=2,
)


def torch_clip(config: CLIPTextConfig, seed: int = 0, device: str | None = None, with_projection: bool = False):
  """A random transformers CLIPTextModel, or (`with_projection`, SDXL's tower 2) CLIPTextModelWithProjection."""
  torch.manual_seed(seed)
  architecture = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
  hf_config = transformers.CLIPTextConfig(**config.to_transformers_dict(architecture))
  cls = getattr(transformers, architecture)
  if device == "meta":
    with torch.device("meta"):
      return cls(hf_config).eval()
  model = cls(hf_config).eval()
  with torch.no_grad():  # random LayerNorm affine params, so a transposed scale/bias would show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def state_numpy(module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def torch_unet(sd2: bool = False, seed: int = 0, cross_attention_dim: int = 32, device: str | None = None, **overrides):
  """A small random diffusers UNet in SD 1.x shape (conv projections, one head count) or SD 2.x shape
  (linear projections, per-block head counts)."""
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  kwargs = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=cross_attention_dim,
    attention_head_dim=(2, 4, 4) if sd2 else 4,
    use_linear_projection=sd2,
    norm_num_groups=8,
  )
  kwargs.update(overrides)
  if device == "meta":
    with torch.device("meta"):
      return diffusers.UNet2DConditionModel(**kwargs).eval()
  model = diffusers.UNet2DConditionModel(**kwargs).eval()
  _perturb(model)
  return model


def torch_vae(seed: int = 0, device: str | None = None, **overrides):
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(seed)
  kwargs = dict(
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
  )
  kwargs.update(overrides)
  if device == "meta":
    with torch.device("meta"):
      return diffusers.AutoencoderKL(**kwargs).eval()
  model = diffusers.AutoencoderKL(**kwargs).eval()
  _perturb(model)
  return model


def _perturb(model):
  """diffusers zero-initialises some output layers; random values everywhere make transposition bugs show."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn_like(p))


def write_clip_model(folder: str, seed: int = 0):
  """A small random transformers CLIPModel (ViT layout, real vocabulary) with its image processor config, saved
  as a user's local folder; returns the PyTorch model. Short side 40 then a 32 crop: resize and crop both act."""
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
    text_config=dict(
      vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      max_position_embeddings=77, eos_token_id=2,  # openai/clip-vit-base-patch32 still carries the legacy id
    ),
    vision_config=dict(
      hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    ),
    projection_dim=16,
  )  # fmt: skip
  model = transformers.CLIPModel(config).eval()
  model.save_pretrained(folder)
  processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
  processor.save_pretrained(folder)
  return model

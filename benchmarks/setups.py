"""What the benchmarks run on: the model sizes (random weights) and the H200's dense peak for MFU."""

from __future__ import annotations

from advunlearn_jax.models import clip_text, presets
from advunlearn_jax.models import unet as unet_lib

SIZES = ("tiny", "small", "sd14")
H200_PEAK_TFLOPS = {"bfloat16": 989.0, "float32": 494.0}  # fp32 as TF32, JAX's default precision there


def configs(size: str) -> tuple[clip_text.CLIPTextConfig, unet_lib.UNetConfig]:
  """SD v1.4's CLIP-L and UNet, or CPU-sized ones with the same block types: `tiny` (16x16 latents, 32/64
  channels) and `small` (8x8 latents, 32 channels, where a batched UNet call costs less per row on a CPU)."""
  if size == "sd14":
    return clip_text.CLIPTextConfig(), unet_lib.UNetConfig.from_dict(presets.SD14_UNET)
  clip = clip_text.CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
  )
  unet = unet_lib.UNetConfig(
    block_out_channels=(32, 32) if size == "small" else (32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    num_attention_heads=(4, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    sample_size=8 if size == "small" else 16,
  )
  return clip, unet

"""The diffusers UNet holding the same weights as a Flax UNet: the PyTorch baseline of the benchmarks."""

from __future__ import annotations

import argparse
from typing import Any

from advunlearn_jax.convert import torch_layout
from advunlearn_jax.models import unet as unet_lib


def diffusers_unet(unet_cfg: unet_lib.UNetConfig, unet_params: Any, device: str):
  import diffusers
  import torch

  unet = diffusers.UNet2DConditionModel.from_config(unet_cfg.to_diffusers_dict()).eval()
  state = torch_layout.flax_to_torch(unet_params, list_names=unet_lib.LIST_NAMES)
  unet.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})
  return unet.to(device)


def add_matmul_precision_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
    "--torch_matmul_precision",
    default="high",
    help="PyTorch's fp32 matmuls on GPUs: 'high' is TF32, the arithmetic of JAX's default there (the default "
    "here); 'highest' is PyTorch's own default, as the reference runs",
  )

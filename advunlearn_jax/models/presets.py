"""The published Stable Diffusion component configs, for shape checks and random-weight benchmarks."""

SD14_UNET = {
  "_class_name": "UNet2DConditionModel",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": False,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": True,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD21_UNET = {
  **SD14_UNET,
  "attention_head_dim": [5, 10, 20, 20],
  "cross_attention_dim": 1024,
  "use_linear_projection": True,
  "upcast_attention": True,
  "sample_size": 96,
}

# SD 2.x's text tower: OpenCLIP ViT-H/14's, as stabilityai/stable-diffusion-2-1-base ships it (transformers layout).
SD2_TEXT = {
  "hidden_act": "gelu",
  "hidden_size": 1024,
  "intermediate_size": 4096,
  "num_attention_heads": 16,
  "num_hidden_layers": 23,
  "projection_dim": 512,
}

SD14_VAE = {
  "_class_name": "AutoencoderKL",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D"] * 4,
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D"] * 4,
}

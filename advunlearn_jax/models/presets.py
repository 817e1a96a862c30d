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

# SDXL 1.0 base's UNet, as stabilityai/stable-diffusion-xl-base-1.0 ships unet/config.json (keys that only hold
# diffusers' defaults left out): no attention at the top level, 1/2/10 transformer layers per block, and the
# `text_time` embedding of the 1280-wide pooled text embeddings plus six 256-channel micro-conditioning ids.
SDXL_UNET = {
  **SD14_UNET,
  "addition_embed_type": "text_time",
  "addition_embed_type_num_heads": 64,
  "addition_time_embed_dim": 256,
  "attention_head_dim": [5, 10, 20],
  "block_out_channels": [320, 640, 1280],
  "cross_attention_dim": 2048,
  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
  "projection_class_embeddings_input_dim": 2816,
  "sample_size": 128,
  "transformer_layers_per_block": [1, 2, 10],
  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
  "upcast_attention": None,
  "use_linear_projection": True,
}

# SDXL's two text towers (text_encoder/, text_encoder_2/ in transformers layout): OpenAI CLIP-L, and OpenCLIP
# bigG with its projection (CLIPTextModelWithProjection). Both configs carry the legacy eos_token_id 2.
SDXL_TEXT = {"eos_token_id": 2}
SDXL_TEXT_2 = {
  "hidden_act": "gelu",
  "hidden_size": 1280,
  "intermediate_size": 5120,
  "num_attention_heads": 20,
  "num_hidden_layers": 32,
  "projection_dim": 1280,
  "bos_token_id": 0,
  "eos_token_id": 2,
  "pad_token_id": 1,
}

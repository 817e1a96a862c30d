"""AdvUnlearn erasing nudity from SDXL base 1.0, through both text encoders (not yet run on SDXL base's weights:
none here; `main` runs it on a micro SDXL folder in tests/test_sdxl_train.py).

  python -m advunlearn_jax.main --config=configs/sdxl_nudity.py --workdir=workdirs/sdxl_nudity \
      [--config.model.pretrained=DIR_OR_ID]

Carried over from the reference's SD v1.4 nudity run (configs/nudity.py): 1000 iterations (200 warm-up), Adam lr
1e-5, the 30-step attack (Adam, lr 1e-3) with k = 1 prefix token from random vocabulary rows, retain weight 0.3
on coco_object (batch 5), ESD's eta = 1 and the rollout guidance 3 on the ldm DDIM grid of 50 steps.

SDXL's own: 1024x1024 images (128x128 latents: the UNet's sample_size), the pipeline's default micro-conditioning
(original and target size 1024, crop (0, 0)), zeros as the unconditional branch (force_zeros_for_empty_prompt).

Stated choices where the reference has nothing to carry:
* train.method text_encoders_full: both towers. The attack's soft token is one row per tower (unlearn/step.py
  SDXLText: a text attacker types one prompt and SDXL reads it through both), so the concept reaches the UNet
  through both halves of the context and through tower 2's pooled embedding; a defender that leaves a tower
  as it was leaves the attacker a clean path. text_encoder_full (tower 1) or text_encoder_2_full train one.
* model.dtype bfloat16 with remat "dots": the frozen SDXL UNet (2.6 B parameters) stored in bf16 for reading
  (text-encoder methods never train it) and activations at 128x128 latents recomputed: what fits one 80 GB
  accelerator; the text towers' master weights and Adam state stay fp32.
"""

from advunlearn_jax import config_lib

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def get_config():
  c = config_lib.base_config()
  c.model.pretrained = SDXL_BASE
  c.model.dtype = "bfloat16"
  c.model.remat = "dots"
  c.concept.prompts = ("nudity",)
  c.train.method = "text_encoders_full"
  c.retain.weight = 0.3
  c.evaluation.classifier = "nudenet"
  c.evaluation.unlearndiff.k = 5
  c.evaluation.inversion.placement = "prefix"
  return c

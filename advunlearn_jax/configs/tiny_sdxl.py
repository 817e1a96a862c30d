"""AdvUnlearn on the repo's tiny SDXL-layout model (`tiny_sdxl`, docs/tiny_world.md): both text towers made robust,
the same concept, prompts, budgets and evaluation as configs/tiny.py.

  python -m advunlearn_jax.main --config=configs/tiny_sdxl.py --workdir=workdirs/tiny_sdxl
  python -m advunlearn_jax.evaluate --config=configs/tiny_sdxl.py --pipeline=workdirs/tiny_sdxl/pipeline --out=DIR

What differs from configs/tiny.py is what SDXL's layout asks, as in configs/sdxl_nudity.py: train.method
text_encoders_full trains both towers, against one adversarial prompt whose soft tokens are a row in each tower's
table (unlearn/step.py SDXLText); the unconditional branch is zeros (the folder's force_zeros_for_empty_prompt);
the micro-conditioning ids are the pipeline's defaults (32x32 images). An SDXL model is evaluated through its
exported `pipeline/` (both towers), with UnlearnDiffAtk or CCE, the attacks that read both towers; Ring-A-Bell,
P4D and MMA-Diffusion read SD 1.x's one text encoder and refuse an SDXL model.
"""

from advunlearn_jax.configs import tiny


def get_config(concept: str = "triangle"):
  c = tiny.get_config(concept)
  c.model.pretrained = "tiny_sdxl"  # the bundled SDXL-layout tiny model (no downloads)
  c.train.method = "text_encoders_full"
  return c

"""AdvUnlearn erasing Van Gogh's style from Stable Diffusion v1.4.

  python -m advunlearn_jax.main --config=configs/style.py --workdir=workdirs/vangogh \
      [--config.concept.prompts="('Claude Monet',)"] [--config.model.pretrained=DIR_OR_ID]

Reference settings (issue #7 of the reference): retain weight 0.5 on the object retain set, batch 5;
otherwise as configs/nudity.py. Expected: Van Gogh ASR of a few percent with FID/CLIP near SD v1.4.
"""

from advunlearn_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.concept.prompts = ("Van Gogh",)
  c.retain.weight = 0.5
  # python -m advunlearn_jax.evaluate --config=configs/style.py --text_encoder=DIR --out=DIR
  #   --config.evaluation.prompts_csv=vangogh.csv --config.evaluation.classifier=hf:STYLE_VIT_DIR:vincent-van-gogh:1
  c.evaluation.unlearndiff.k = 3
  # CCE's token stands where the painter's name stood; vangogh.csv's prompts say "by Vincent van Gogh". With
  # another painter, set these words too.
  c.evaluation.inversion.words = ("Vincent van Gogh", "Van Gogh")
  return c

"""AdvUnlearn erasing an object (church by default) from Stable Diffusion v1.4.

  python -m advunlearn_jax.main --config=configs/object.py --workdir=workdirs/church \
      [--config.concept.prompts="('garbage truck',)"] [--config.model.pretrained=DIR_OR_ID]

Reference settings: retain weight 0.5 on the object retain set, batch 5. The reference's objects are church,
garbage truck, parachute and tench (whose BPE split 'ten'+'ch' the faithful word split truncates).
"""

from advunlearn_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.concept.prompts = ("church",)
  c.retain.weight = 0.5
  # python -m advunlearn_jax.evaluate --config=configs/object.py --text_encoder=DIR --out=DIR
  #   --config.evaluation.prompts_csv=church.csv --config.evaluation.classifier=hf:RESNET50_DIR:497
  # (ImageNet ids: church 497, garbage truck 569, parachute 701, tench 0)
  c.evaluation.unlearndiff.k = 3
  return c

"""AdvUnlearn erasing nudity from Stable Diffusion v1.4: the README command of the reference.

  python -m advunlearn_jax.main --config=configs/nudity.py --workdir=workdirs/nudity \
      [--config.model.pretrained=DIR_OR_ID]

Reference settings: text_encoder_full, retain weight 0.3 on the coco_object retain set (batch 5), 1000
iterations (200 warm-up), 30-step attack, k = 1 prefix token, random init. Target (paper, UnlearnDiffAtk on
SD v1.4): nudity ASR about 21% (ESD: 76%), FID about 19.3, CLIP score about 0.29. Expect many GPU-hours online;
the trajectory bank cuts that.

One deviation stays by default: the concept is split into positions by BPE tokens. 'nudity' is two tokens
('nu', 'dity') but one word, and the reference's word count puts 'dity' where its adversarial token goes, so its
adversarial prompt reads [SOT, delta, 'nu', EOT, ...]. --config.attack.faithful_word_split=True reproduces that;
the README's "The paper's nudity run, flag for flag" gives the full command.
"""

from advunlearn_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.concept.prompts = ("nudity",)
  c.retain.weight = 0.3
  # python -m advunlearn_jax.evaluate --config=configs/nudity.py --text_encoder=DIR --out=DIR
  #   --config.evaluation.prompts_csv=nudity.csv  (UnlearnDiffAtk's 142 prompts; pip install -e .[nudity])
  c.evaluation.classifier = "nudenet"
  c.evaluation.unlearndiff.k = 5
  # I2P-style prompts name no concept word: the token goes in front, as CCE's I2P generator means to
  # (generate_i2p.py:41-44); it is still trained on the templates, not on their I2P captions (not reproduced).
  c.evaluation.inversion.placement = "prefix"
  return c

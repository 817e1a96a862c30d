"""The README's default run: AdvUnlearn on the repo's own tiny text-to-image model, on a laptop CPU.

  python -m advunlearn_jax.main --config=configs/tiny.py --workdir=workdirs/tiny

Until the tiny world (issue 5) and the trainer (issue 4) land, this resolves and prints the config.
"""

from advunlearn_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.model.pretrained = "tiny"  # the bundled tiny Stable Diffusion (no downloads)
  c.concept.prompts = ("triangle",)
  c.retain.weight = 0.5
  c.train.iterations = 40
  c.train.warmup_iters = 10
  c.train.save_every = 20
  c.attack.steps = 5
  return c

"""STEREO (issue 49) on the repo's tiny model: the same concept, prompts and evaluation as configs/tiny.py.

  python -m advunlearn_jax.main --config=configs/tiny_stereo.py --workdir=workdirs/tiny_stereo
  python -m advunlearn_jax.main --config=configs/tiny_stereo.py:striped --workdir=workdirs/tiny_stereo_striped

Budgets scaled to the tiny world, as configs/tiny.py scales AdvUnlearn's (its lr 1e-3 for the reference's 1e-5):
learning rates x100 (ste 5e-4, reo 2e-3; their ratio 1:4 kept), 200 iterations per erase as theirs, 500 inversion
steps a round (the tiny world's CCE converges within 500, benchmarks/inversion_budget_tiny.py) on 32 rendered
images. The rest is theirs (config_lib's stereo section). Anchors: the tiny world has no anchor file; REO anchors
on the retain prompts (the world's prompts that do not name the concept). The `stereo` row of the tiny table,
`python benchmarks/erasure_tiny.py --methods=stereo`, is this config (docs/training.md, "STEREO, as its authors
run it").
"""

from advunlearn_jax.configs import tiny


def get_config(concept: str = "triangle"):
  c = tiny.get_config(concept)
  s = c.stereo
  s.enabled = True
  s.ste_lr = 5e-4
  s.reo_lr = 2e-3
  s.ti_steps = 500
  s.images = f"tiny_world:{concept}"
  s.max_images = 32
  s.initializer = c.evaluation.inversion.cce.initializer
  s.templates = c.evaluation.inversion.cce.templates
  s.anchors = tuple(c.retain.prompts)
  return c

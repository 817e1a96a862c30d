"""The README's default run: AdvUnlearn on the repo's own tiny text-to-image model, on a laptop CPU.

  python -m advunlearn_jax.main --config=configs/tiny.py --workdir=workdirs/tiny
  python -m advunlearn_jax.main --config=configs/tiny.py:striped --workdir=workdirs/tiny_striped

The argument after ':' is the concept to erase: a shape (default: triangle), a style or a colour of the tiny
world. The retain set is the world's prompts that do not name it; after training, `workdir/report/` holds the
judge's recognition rates before/after and the image grids.
"""

from advunlearn_jax import config_lib
from advunlearn_jax.tiny import world


def retain_prompts(concept: str) -> tuple[str, ...]:
  """Prompts naming a value of the concept's attribute type other than the concept, with varied others."""
  if concept in world.SHAPES:
    keep = [s for s in range(len(world.SHAPES)) if world.SHAPES[s] != concept]
    return tuple(world.canonical_prompt(shape=s, color=c) for s in keep for c in range(len(world.COLORS)))
  if concept in world.STYLES:
    keep = [t for t in range(len(world.STYLES)) if world.STYLES[t] != concept]
    return tuple(world.canonical_prompt(shape=s, style=t) for t in keep for s in range(len(world.SHAPES)))
  if concept in world.COLORS:
    keep = [c for c in range(len(world.COLORS)) if world.COLORS[c] != concept]
    return tuple(world.canonical_prompt(shape=s, color=c) for c in keep for s in range(len(world.SHAPES)))
  raise ValueError(f"configs/tiny.py: {concept!r} is not a tiny-world shape, style or colour")


def concept_prompt(concept: str) -> str:
  """The erased prompt in the world's phrasing: 'a photo of a triangle', 'a photo of a striped shape'."""
  for kind, values in (("shape", world.SHAPES), ("style", world.STYLES), ("color", world.COLORS)):
    if concept in values:
      return world.canonical_prompt(**{kind: values.index(concept)})
  raise ValueError(f"configs/tiny.py: {concept!r} is not a tiny-world shape, style or colour")


def get_config(concept: str = "triangle"):
  c = config_lib.base_config()
  c.model.pretrained = "tiny"  # the bundled tiny Stable Diffusion (no downloads)
  c.concept.prompts = (concept_prompt(concept),)
  c.retain.prompts = retain_prompts(concept)
  c.retain.weight = 1.0
  c.retain.batch = 5
  c.diffusion.ddim_steps = 50
  c.diffusion.start_guidance = 3.0
  c.train.xt_source = "bank"  # the frozen rollouts once, then seconds per iteration
  c.bank.concept_trajectories = 16
  c.train.iterations = 200
  c.train.warmup_iters = 40
  c.train.lr = 3e-4
  c.train.save_every = 100
  c.train.log_every = 10
  c.attack.steps = 10
  c.attack.lr = 1e-2
  c.samples.every = 100
  c.samples.prompts = (*c.concept.prompts, *c.retain.prompts[:: max(1, len(c.retain.prompts) // 4)][:4])
  c.samples.guidance = 5.0
  c.report.kind = "tiny_world"
  # UnlearnDiffAtk against the erased concept, judged by the shipped judge (python -m advunlearn_jax.evaluate).
  kind, index = world.attribute_of(concept)
  c.evaluation.prompts = tuple(world.attribute_prompts(kind, index, 12))
  c.evaluation.classifier = f"judge:{kind}={concept}"
  c.evaluation.guidance = 5.0
  c.evaluation.target_scheduler = "ddim"
  c.evaluation.target_steps = 25
  c.evaluation.attack.k = 3
  c.evaluation.attack.iters_per_t = 20
  c.evaluation.attack.timesteps = tuple(range(10, 1000, 40))
  c.evaluation.attack.scheduler = "ddim"
  c.evaluation.attack.steps = 25
  return c

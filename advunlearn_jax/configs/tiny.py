"""The README's default run: AdvUnlearn on the repo's own tiny text-to-image model, on a laptop CPU.

  python -m advunlearn_jax.main --config=configs/tiny.py --workdir=workdirs/tiny
  python -m advunlearn_jax.main --config=configs/tiny.py:striped --workdir=workdirs/tiny_striped

The argument after ':' is the concept to erase: a shape (default: triangle), a style or a colour of the tiny
world. The prompt sets come from advunlearn_jax/tiny/prompts.py: the retain set is the world's prompts
that do not name it; after training, `workdir/report/` holds the
judge's recognition rates before/after and the image grids.
"""

from advunlearn_jax import config_lib
from advunlearn_jax.tiny import prompts, world


def get_config(concept: str = "triangle"):
  c = config_lib.base_config()
  c.model.pretrained = "tiny"  # the bundled tiny Stable Diffusion (no downloads)
  c.concept.prompts = prompts.concept_prompts(concept)
  c.retain.dataset = ""
  c.retain.prompts = prompts.retain_prompts(concept)
  c.retain.weight = 4.0  # measured: 1.0 kept 58-72% of the other shapes' recognition, 4.0 all of it
  c.retain.batch = 5
  c.diffusion.ddim_steps = 50
  c.diffusion.start_guidance = 3.0
  # The renewing bank (config_lib's bank.refresh_* defaults): 1.3 iterations/s here. The faithful `online` mode
  # measured ~4.5 s per attacking iteration on 2 cores, about 12 minutes for this run's training alone.
  c.train.xt_source = "bank"
  c.bank.concept_trajectories = 8  # per concept prompt
  c.train.iterations = 200
  c.train.warmup_iters = 40
  c.train.lr = 1e-3
  c.train.save_every = 100
  c.train.log_every = 10
  # Measured (benchmarks/erasure_tiny.py): 10 steps on 1 token left UnlearnDiffAtk at 75% ASR (ESD: 83%);
  # 30 steps on 3 tokens, as many as the evaluation attack uses, took it to 29% = pre-ASR.
  c.attack.steps = 30
  c.attack.num_tokens = 3
  c.attack.lr = 1e-2
  c.samples.every = 100
  c.samples.prompts = (c.concept.prompts[0], *c.retain.prompts[:: max(1, len(c.retain.prompts) // 4)][:4])
  c.samples.guidance = 5.0
  c.report.kind = "tiny_world"
  c.report.erased = (concept,)
  c.report.images_per_value = 16  # 24 took the run to 5:00-5:35 on 2 cores; 16 keeps it inside 5 minutes
  # UnlearnDiffAtk against the erased concept, judged by the shipped judge (python -m advunlearn_jax.evaluate).
  c.evaluation.prompts = prompts.evaluation_prompts(concept)
  c.evaluation.classifier = f"judge:{world.attribute_of(concept)[0]}={concept}"
  c.evaluation.guidance = 5.0
  c.evaluation.target_scheduler = "ddim"
  c.evaluation.target_steps = 25
  c.evaluation.target_guidance = 5.0  # the tiny model's guidance throughout
  c.evaluation.unlearndiff.k = 3
  c.evaluation.unlearndiff.iters_per_t = 20
  c.evaluation.unlearndiff.timesteps = tuple(range(10, 1000, 100))  # 10 blocks: 200 iterations at most
  c.evaluation.unlearndiff.scheduler = "ddim"
  c.evaluation.unlearndiff.steps = 25
  c.evaluation.inversion.images = f"tiny_world:{concept}"
  c.evaluation.inversion.words = (concept,)  # every evaluation prompt names the value; the learned token replaces it
  # CCE's initializer is a word related to the concept (train.sh: "art" for a painter); here the generic word
  # of the concept's attribute, and the templates of its kind (a shape or colour is an object, a pattern a style).
  kind = world.attribute_of(concept)[0]
  c.evaluation.inversion.cce.initializer = {"shape": "shape", "color": "color", "style": "pattern"}[kind]
  c.evaluation.inversion.cce.templates = "style" if kind == "style" else "object"
  c.evaluation.inversion.scheduler = "ddim"
  c.evaluation.inversion.sample_steps = 25
  # The three discrete attacks of issue 48 on the same cases, rendered as the others (DDIM, 25 steps, one image).
  c.evaluation.ring_a_bell.vector = f"tiny_world:{concept}"
  c.evaluation.p4d.selector = "judge"
  c.evaluation.p4d.target_images = 1
  c.evaluation.p4d.images = 1
  c.evaluation.mma.banned_words = world.words_of(concept)  # the concept's own words, as the authors' nudity list
  for section in (c.evaluation.ring_a_bell, c.evaluation.p4d, c.evaluation.mma):
    section.scheduler, section.sample_steps = "ddim", 25
  return c

"""The discrete attacks' common end (Ring-A-Bell, P4D, MMA-Diffusion): each case's unattacked image, then the
prompts a search found at its checkpoints judged on the attacked model, stopping at the first success; and the
released prompts, one CSV per evaluation that any model can run again.

A search is a generator of (budget, prompt text) at its checkpoints, so a case stops searching at its first
success as UnlearnDiffAtk and CCE stop (evals/budgets.py reads one run as the whole ASR-against-budget curve). A
found prompt is text: it is tokenised again and rendered as the attacked pipeline would render any prompt
(EOT padding, cut at 77 tokens), which is how each attack's authors hand their prompts to Stable Diffusion.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.evals import unlearndiff

Search = Callable[[int, object], Iterator[tuple[int, str]]]  # (case index, EvalPrompt) -> (budget, prompt text)

CSV_NAME = "adversarial_prompts.csv"
CSV_COLUMNS = ("case_number", "prompt", "adv_prompt", "evaluation_seed", "evaluation_guidance", "pre_success")
CSV_COLUMNS += ("success", "budget", "attack")


def render_text(pipe, text: str, seed: int, guidance: float, sampler, images: int = 1, uncond=None) -> np.ndarray:
  """`images` classified images of a prompt, the start latents of `seed` (as one pipeline call with
  num_images_per_prompt), uint8 [images, H, W, 3]."""
  tokenizer = tok_lib.load_tokenizer(pipe.tokenizer_dir)
  ids = np.repeat(tok_lib.tokenize(tokenizer, [text]), images, axis=0)
  if uncond is None or jax.tree.leaves(uncond)[0].shape[0] != images:
    uncond = unlearndiff.empty_prompt(pipe, pipe.text_params, images)
  return unlearndiff.render_ids(pipe, ids, seed, guidance, sampler, pipe.text_params, uncond)


def judged_cases(
  pipe, prompts: Sequence, classifier, sampler, search: Search, *, attack: bool, progress: Callable, images: int = 1
) -> list[unlearndiff.Outcome]:
  """Each case's unattacked images, then (unless they show the concept, or `attack` is False) the prompts
  `search` yields, each rendered (`images` per prompt, broken if any shows the concept) until one succeeds."""
  outcomes = []
  for i, p in enumerate(prompts):
    start = time.perf_counter()
    shown = render_text(pipe, p.prompt, p.seed, p.guidance, sampler, images)
    pre = bool(np.any(classifier(shown)))
    outcome = unlearndiff.Outcome(
      prompt=p.prompt, seed=p.seed, guidance=p.guidance, pre_success=pre, success=pre, adv_tokens="", adv_prompt="",
      timestep=-1, iterations=0, seconds=0.0, image=shown[0],
    )  # fmt: skip
    if attack and not pre:
      for budget, text in search(i, p):
        shown = render_text(pipe, text, p.seed, p.guidance, sampler, images)
        flagged = np.asarray(classifier(shown), bool)
        success = bool(flagged.any())
        image = shown[int(np.argmax(flagged))]
        outcome = outcome._replace(success=success, adv_tokens=text, adv_prompt=text, iterations=budget, image=image)
        if success:
          break
    outcome = outcome._replace(seconds=time.perf_counter() - start)
    progress(i, outcome)
    outcomes.append(outcome)
  return outcomes


def shown_text(outcome: unlearndiff.Outcome) -> str:
  """The text a case's verdict was rendered from: the found prompt once an attack ran, else the prompt."""
  return outcome.adv_prompt if outcome.iterations else outcome.prompt


def write_csv(path: str, prompts: Sequence, outcomes: Sequence, attack: str) -> None:
  """The released prompts: for each case the text that was shown last (the found prompt, or the prompt itself
  where no attack ran), with its seed, guidance, verdict and the budget it took. `evaluation.prompts_csv=` this
  file with `evaluation.prompts_column=adv_prompt` and --no_attack renders them on any model."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for p, o in zip(prompts, outcomes):
      row = [p.case, o.prompt, shown_text(o), o.seed, o.guidance, int(o.pre_success), int(o.success), o.iterations]
      writer.writerow([*row, attack])

"""The search for a defence that holds (issue 49), on the tiny world: every variant tried, in one resumable command.

  python benchmarks/defence_tiny.py --seeds=0 --concepts=triangle --variants=esd_u_retain16
  python benchmarks/defence_tiny.py --seeds=0,1                      # every variant, both concepts

Each variant is configs/tiny.py on the faithful path (online rollouts) with its overrides, trained, measured and
tabled exactly as an ablation row (ablations_tiny.py): the same cases, UnlearnDiffAtk, CCE placed and budgeted as
published, the discrete attacks, retain accuracy, training seconds. Runs live beside the tables' rows as
`<concept>/defence_<variant>_seed<k>` under --out (their JSON pieces kept in git like every row's); the table is
defence.md and defence.json. A variant stays in DEFENCES once tried, whatever it gave: docs/results.md reads
every one of them.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.ablations_tiny import Variant, parse_args, run  # noqa: E402

# `ablation` says what the variant changes, `paper` what it tests. The goal (issue 49): CCE breaks at most 1 case
# in 5, no attack breaks more than against AdvUnlearn, retain accuracy within 5 points of AdvUnlearn's.
DEFENCES = {
  "word_esd": Variant(
    "advunlearn",
    ("attack.type=word_k",),
    "text encoder, word-place attack",
    "does training against tokens in the word's place (where CCE puts its token) cover CCE?",
  ),
  "word_both": Variant(
    "advunlearn",
    ("attack.type=word_k", "attack.objective=both"),
    "text encoder, word-place attack, ESD + inversion objective",
    "does the inner attack's search need CCE's own loss on the concept's images?",
  ),
  "esd_u_lr3e-4": Variant(
    "esd",
    ("train.method=noxattn", "train.lr=3e-4"),
    "UNet (no cross-attention), retain 4, lr 3e-4, no attack",
    "the paper's ESD holds against CCE but loses the other shapes: does the retain term at a gentler rate keep both?",
  ),
  "esd_u_retain16": Variant(
    "esd",
    ("train.method=noxattn", "retain.weight=16.0"),
    "UNet (no cross-attention), retain 16, lr 1e-3, no attack",
    "between esd_retain (retain 4: CCE 4/24, retain 87% on the triangle) and esd_u_lr3e-4: a heavier retain term",
  ),
  "esd_u_batch15": Variant(
    "esd",
    ("train.method=noxattn", "retain.batch=15"),
    "UNet (no cross-attention), retain 4 over 15 prompts a step, lr 1e-3, no attack",
    "retain 16 kept the other shapes but no longer erased (75% unattacked), yet CCE added nothing to that: on the "
    "UNet the erasure's reach, not CCE, decides. Does a steadier retain estimate keep retain 4's erasure and more "
    "of the other shapes?",
  ),
  "esd_u_batch15_400": Variant(
    "esd",
    ("train.method=noxattn", "retain.batch=15", "train.iterations=400"),
    "UNet (no cross-attention), retain 4 over 15 prompts a step, lr 1e-3 for 400 iterations, no attack",
    "on the style CCE still broke 12/24 over esd_u_batch15's UNet: does twice the erasure, the retain estimate "
    "as steady, reach what CCE finds?",
  ),
  "esd_full_batch15": Variant(
    "esd",
    ("train.method=full", "retain.batch=15"),
    "the whole UNet, cross-attention included, retain 4 over 15 prompts a step, lr 1e-3, no attack",
    "ESD erases styles in cross-attention (ESD-x) and the rest outside it (ESD-u, the noxattn rows here): does "
    "training both erase a texture where CCE cannot reach it?",
  ),
  "esd_full_batch15_textures": Variant(
    "esd",
    ("train.method=full", "retain.batch=15"),
    "esd_full_batch15 with its retain prompts all dotted or checkered (the style's; no plain shapes)",
    "esd_full_batch15 held the style's CCE to 2/24 and kept 6/12 dotted, 3/12 checkered, 11/12 plain: does a "
    "retain term spent on the damaged textures alone give them back without giving CCE more?",
    retain_values=("dotted", "checkered"),
  ),
  "esd_x_batch15": Variant(
    "esd",
    ("train.method=xattn", "retain.batch=15"),
    "cross-attention only (ESD-x), retain 4 over 15 prompts a step, lr 1e-3, no attack",
    "the ESD paper erases artistic styles in cross-attention (ESD-x); every erasure of the texture outside it "
    "blurred dots and checks: does cross-attention alone erase stripes and keep the textures, and does CCE reach "
    "past it?",
  ),
  "esd_x_batch15_400": Variant(
    "esd",
    ("train.method=xattn", "retain.batch=15", "train.iterations=400"),
    "ESD-x as esd_x_batch15, for 400 iterations instead of 200",
    "ESD-x kept 30/36 of the textures (AdvUnlearn 28/36) and let CCE break 8/24: does twice the erasure spend the "
    "two spare textures on holding CCE?",
  ),
  "esd_x_batch15_eta2": Variant(
    "esd",
    ("train.method=xattn", "retain.batch=15", "diffusion.negative_guidance=2.0"),
    "ESD-x as esd_x_batch15, with the ESD target pushed twice as far (negative guidance 2)",
    "ESD-x kept 30/36 of the textures and let CCE break 8/24: does a target further from the stripes hold CCE?",
  ),
  "esd_u_lr5e-4_400": Variant(
    "esd",
    ("train.method=noxattn", "train.lr=5e-4", "train.iterations=400"),
    "UNet (no cross-attention), retain 4, lr 5e-4 for 400 iterations, no attack",
    "the same distance travelled in smaller steps: does the retain term keep up better?",
  ),
  "esd_u_eta0": Variant(
    "esd",
    ("train.method=noxattn", "diffusion.negative_guidance=0.0"),
    "UNet (no cross-attention), retain 4, lr 1e-3, target e_0 (eta 0) instead of ESD's e_0 - (e_p - e_0)",
    "STEREO's STE target collapses to e_0 (docs/training.md): is erasing to the unconditional gentler on the other "
    "values than pushing past it?",
  ),
  "esd_u_lr3e-4_then_advunlearn": Variant(
    "advunlearn",
    (),
    "esd_u_lr3e-4's UNet, then AdvUnlearn on the text encoder over it (two stages)",
    "the UNet erasure that keeps utility holds CCE better than any text encoder, AdvUnlearn's encoder holds "
    "UnlearnDiffAtk: does each stage cover the other's gap?",
    after="esd_u_lr3e-4",
  ),
  "esd_u_batch15_then_advunlearn_batch15": Variant(
    "advunlearn",
    ("retain.batch=15",),
    "esd_u_batch15's UNet, then AdvUnlearn on the text encoder over it, both with 15 retain prompts a step",
    "on the style the gentle UNet erasure left 11/24 unattacked and CCE 22/24 after both stages; 15 retain prompts "
    "a step let the paper's rate erase (2/24 unattacked) at 27/36 retained: do both stages keep that? (striped: "
    "CCE 12/24, retain 24/36)",
    after="esd_u_batch15",
  ),
  "esd_u_batch15_then_advunlearn_retain8": Variant(
    "advunlearn",
    ("retain.batch=15", "retain.weight=8.0"),
    "esd_u_batch15's UNet, then AdvUnlearn over it with 15 retain prompts a step at twice the weight",
    "with 15 retain prompts in both stages the style kept 24/36 (the text-encoder stage took 3) and CCE broke "
    "12/24: does a heavier retain term in the second stage give the textures back without giving CCE more?",
    after="esd_u_batch15",
  ),
  "at_u_batch15": Variant(
    "advunlearn",
    ("train.method=noxattn", "retain.batch=15"),
    "UNet (no cross-attention), AdvUnlearn's prefix attack, retain 4 over 15 prompts a step",
    "AdvUnlearn on the UNet held the style's CCE to 4/24 but kept 22/36 of the textures; 15 retain prompts a step "
    "took ESD on the UNet from 23/36 to 27/36: do they do the same for the adversarially trained UNet?",
  ),
  "at_u_word_both": Variant(
    "advunlearn",
    ("train.method=noxattn", "attack.type=word_k", "attack.objective=both"),
    "UNet (no cross-attention), word-place attack, ESD + inversion objective, retain 4",
    "adversarial training of the UNet against CCE's own threat: its token in the word's place, its loss",
  ),
}


def main():
  run(DEFENCES, parse_args(__doc__, DEFENCES), "defence", folder_prefix="defence_")


if __name__ == "__main__":
  main()

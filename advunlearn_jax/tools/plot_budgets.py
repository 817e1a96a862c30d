"""ASR against attack budget for several evaluated models, in one plot (evals/budgets.py).

python -m advunlearn_jax.tools.plot_budgets --out=asr_vs_budget.png ESD=esd_eval/report.json AdvUnlearn=adv/report.json
"""

from __future__ import annotations

import os

from absl import app, flags

from advunlearn_jax import cli
from advunlearn_jax.evals import budgets

_OUT = flags.DEFINE_string("out", "asr_vs_budget.png", "output PNG")


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("give at least one LABEL=REPORT.json")
  curves, xlabel = budgets.from_reports(argv[1:])
  cli.check_output_folder(os.path.dirname(os.path.abspath(_OUT.value)), "out")
  budgets.plot(curves, _OUT.value, xlabel)
  print(f"wrote {_OUT.value}: {', '.join(curves)}")


if __name__ == "__main__":
  cli.run(main)

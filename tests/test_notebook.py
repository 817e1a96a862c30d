"""notebooks/quickstart.ipynb runs top to bottom (conftest's `quickstart`), so it cannot rot."""

import json
import os

import pytest


@pytest.mark.slow  # a kernel, a two-iteration run, the attack on two prompts, the diffusers load: ~2 min
def test_quickstart_notebook_runs(quickstart):
  nb, workdir = quickstart
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  printed = "".join(o.get("text", "") for o in outputs)
  report = json.load(open(os.path.join(workdir, "evaluation", "report.json")))
  summary = report["robustness"]["summary"]
  assert f"/{summary['prompts']}, 95% CI" in printed.split("pre-ASR", 1)[1]  # the rates carry their counts
  assert "erased concept recognised" in printed
  images = sum("image/png" in o.get("data", {}) for o in outputs)
  assert images == 5  # original, erased, the report's grid, the attack's grid, diffusers' images
  assert os.path.isfile(os.path.join(workdir, "hub", "text_encoder", "model.safetensors"))
  assert open(os.path.join(workdir, "hub", "README.md")).read().startswith("---")

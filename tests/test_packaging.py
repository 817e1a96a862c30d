"""What a stranger installs and may reuse: the package declares what it needs, around the lock the suites run on,
and says under which licence, and how to cite it."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _lock() -> dict[str, str | None]:
  """requirements.txt: name -> pinned version (None where the line pins nothing)."""
  pins = {}
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    for line in f:
      line = line.split("#")[0].strip()
      if line:
        requirement = Requirement(line)
        pin = next((s.version for s in requirement.specifier if s.operator == "=="), None)
        pins[_canonical(requirement.name)] = pin
  return pins


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def test_declared_dependencies_are_the_lock_in_ranges():
  """`pip install .` installs what requirements.txt pins, and the pinned (or installed) versions satisfy the
  declared ranges: the ranges are the ones the suites tested."""
  declared = {_canonical(Requirement(r).name): Requirement(r) for r in _project()["dependencies"]}
  lock = _lock()
  assert set(declared) == set(lock), (
    f"declared only: {set(declared) - set(lock)}, locked only: {set(lock) - set(declared)}"
  )
  for name, requirement in declared.items():
    version = lock[name] or metadata.version(name)
    assert requirement.specifier.contains(version), f"{name} {version} is outside {requirement}"
    assert any(s.operator in ("<", "<=", "~=") for s in requirement.specifier), f"{name}: no upper bound"


def test_licence_and_notice_are_shipped():
  project = _project()
  assert project["license"] == "Apache-2.0"
  with open(os.path.join(ROOT, "LICENSE")) as f:
    text = f.read()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  with open(os.path.join(ROOT, "NOTICE")) as f:
    notice = f.read()
  for asset in sorted(os.listdir(os.path.join(ROOT, "advunlearn_jax", "assets"))):
    assert f"advunlearn_jax/assets/{asset}/" in notice, f"NOTICE says nothing of where assets/{asset} comes from"


def test_citation_file_cites_the_paper():
  with open(os.path.join(ROOT, "CITATION.cff")) as f:
    cff = yaml.safe_load(f)
  assert cff["cff-version"] == "1.2.0" and cff["license"] == _project()["license"]
  assert cff["version"] == _project()["version"]
  paper = cff["preferred-citation"]
  assert (
    paper["title"] == "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models"
  )
  assert paper["year"] == 2024 and [a["family-names"] for a in paper["authors"]][:1] == ["Zhang"]
  assert "2405.15234" in paper["url"]


@pytest.mark.slow  # builds and installs the wheel, then a 2-iteration tiny run: about 2 minutes on 2 cores
def test_installed_package_runs_the_readme_command_outside_the_checkout(tmp_path):
  """`pip install .` (a built wheel, no -e), then the README's tiny command from a folder that is no checkout:
  the shipped tiny model and configs come from the installed package."""
  src = tmp_path / "src"  # pip builds in the source tree: a copy keeps the checkout clean
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "workdirs", "results", "__pycache__", "*.egg-info"))
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True)
  # The dependencies come from this environment (the lock; the test above checks the declared ranges hold it), so
  # the test needs no registry; the package itself is built and installed as a user's pip does it.
  with open(os.path.join(site.strip(), "lock.pth"), "w") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["XLA_FLAGS"] = ""  # one CPU device, as on a user's laptop
  # The wheel is built with this environment's setuptools (a new venv's bundled one may predate PEP 639's licence
  # fields) and installed by the new venv's own pip, as a user's `pip install .` builds and installs it.
  build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", str(src)]
  subprocess.run(build, check=True, env=env, cwd=tmp_path)
  (wheel,) = (tmp_path / "dist").glob("advunlearn_jax-*.whl")
  subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, env=env)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # test_main.py's run settings (its first two iterations), so the compiled steps load from the shared cache.
  overrides = ["train.iterations=2", "train.warmup_iters=0", "train.save_every=2", "attack.steps=2"]
  overrides += ["bank.concept_trajectories=2", "samples.every=0", "report.kind="]  # an empty value: written as nothing
  command = [python, "-m", "advunlearn_jax.main", "--config=configs/tiny.py", "--workdir=run"]
  out = subprocess.run(
    command + [f"--config.{o}" for o in overrides], env=env, cwd=elsewhere, capture_output=True, text=True, timeout=900
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert os.path.isfile(elsewhere / "run" / "text_encoder" / "model.safetensors")
  where = subprocess.check_output(
    [python, "-c", "import advunlearn_jax; print(advunlearn_jax.__file__)"], env=env, cwd=elsewhere, text=True
  )
  assert where.startswith(site.strip()), where  # the installed package, not the checkout

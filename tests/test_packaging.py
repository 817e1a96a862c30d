"""What a stranger installs and may reuse: the package declares what it needs, around the lock the suites run on,
and says under which licence, and how to cite it."""

import os
import re
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

"""README and docs/ read on GitHub: every relative link names a file that is there and every #anchor a heading of
it; every page of docs/ is reachable from the README; the README stays a front page (under 200 lines)."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(f"docs/{name}" for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
PAGES = ["README.md", *DOCS]


def _prose(path: str) -> list[str]:
  """The page's lines outside fenced code blocks."""
  lines, fenced = [], False
  with open(os.path.join(ROOT, path)) as f:
    for line in f:
      if line.lstrip().startswith("```"):
        fenced = not fenced
      elif not fenced:
        lines.append(line.rstrip("\n"))
  return lines


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading (github-slugger): lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
  seen: dict[str, int] = {}
  anchors = set()
  for line in _prose(path):
    match = re.match(r"#{1,6} (.*)", line)
    if match:
      slug = _slug(match.group(1))
      anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
      seen[slug] = seen.get(slug, 0) + 1
  return anchors


def _links(path: str) -> list[str]:
  text = "\n".join(_prose(path))
  text = re.sub(r"`[^`]*`", "", text)  # code spans hold no links
  return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_and_anchor_resolves(page):
  for target in _links(page):
    if re.match(r"[a-z]+:", target):  # https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(os.path.join(ROOT, resolved)), f"{page}: link to {target}: no {resolved}"
    if anchor:
      assert resolved.endswith(".md"), f"{page}: {target}: an anchor into a file that is no page"
      assert anchor in _anchors(resolved), f"{page}: {target}: {resolved} has no heading #{anchor}"


def test_every_page_is_linked_from_the_readme_and_the_readme_is_a_front_page():
  linked = {os.path.normpath(link.partition("#")[0]) for link in _links("README.md")}
  assert set(DOCS) <= linked, f"pages the README does not link: {sorted(set(DOCS) - linked)}"
  with open(os.path.join(ROOT, "README.md")) as f:
    assert len(f.readlines()) < 200


def test_slugs_are_githubs():
  assert _slug("The paper's ablations on the tiny world") == "the-papers-ablations-on-the-tiny-world"
  assert (
    _slug("Utility on the paper's scale: FID, and the `CLIP` score")
    == "utility-on-the-papers-scale-fid-and-the-clip-score"
  )

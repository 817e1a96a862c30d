"""Heaviest files first: the order in which xdist hands whole files to its workers (`--dist loadfile`).

xdist's own order puts files with the most tests first, and a test count says little about seconds here: one
file holds a 3-minute end-to-end run, another 80 one-second checks. When a heavy file is handed out last, one
worker runs it alone while the other idles. Handing out the longest file first (the classic longest-processing-
time rule) keeps both busy to the end (what it saves: docs/code_map.md, "The tests").

The seconds per test come from a run of the suites with `--record-test-seconds` (tests/conftest.py), in the
format pytest-split keeps in `.test_durations` (node id -> seconds), so that tool can read or write it too."""

import json
import os
from collections import defaultdict

SECONDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_seconds.json")
# A test not yet recorded counts as a typical slower test, so a new file is not handed out last by default.
UNRECORDED_SECONDS = 10.0


def load(path: str = SECONDS_FILE) -> dict[str, float]:
  """The recorded seconds per node id; empty when nothing is recorded (files then go in collection order)."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {}


def heaviest_files_first(items: list, seconds: dict[str, float]) -> None:
  """Sorts `items` (pytest items, in place) by their file's total recorded seconds, heaviest first; a file's own
  tests keep their order, so its module fixtures are built once as before. Only the selected tests count (the
  hook runs after -m and -k): a removed or deselected test's seconds weigh nothing."""
  if not seconds:
    return
  per_file = defaultdict(float)
  for item in items:
    per_file[str(item.path)] += seconds.get(item.nodeid, UNRECORDED_SECONDS)
  rank = {path: i for i, path in enumerate(sorted(per_file, key=lambda path: (-per_file[path], path)))}
  items.sort(key=lambda item: rank[str(item.path)])  # stable


def merge(path: str, measured: dict[str, float]) -> None:
  """Writes `measured` over the recorded seconds of the same tests, keeping the others' (a fast-suite run leaves
  the slow suite's seconds as they were). Written whole or not at all."""
  seconds = load(path)
  seconds.update({node: round(s, 2) for node, s in measured.items()})
  with open(path + ".part", "w") as f:
    json.dump(dict(sorted(seconds.items())), f, indent=0)
    f.write("\n")
  os.replace(path + ".part", path)

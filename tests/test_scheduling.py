"""The order in which xdist hands files to its workers (tests/scheduling.py)."""

import json
import pathlib
from types import SimpleNamespace

from tests import scheduling


def _item(nodeid):
  return SimpleNamespace(nodeid=nodeid, path=pathlib.Path(nodeid.split("::")[0]))


def test_the_heaviest_file_goes_first_and_each_file_keeps_its_own_order():
  ids = ["a.py::one", "a.py::two", "b.py::slow", "c.py::x", "c.py::y", "c.py::z"]
  items = [_item(i) for i in ids]
  seconds = {"a.py::one": 1.0, "a.py::two": 2.0, "b.py::slow": 100.0, "c.py::x": 4.0, "c.py::y": 4.0}
  scheduling.heaviest_files_first(items, seconds)
  # b 100 s; c 8 s recorded plus z unrecorded (counted as UNRECORDED_SECONDS, 10); a 3 s.
  assert [i.nodeid for i in items] == ["b.py::slow", "c.py::x", "c.py::y", "c.py::z", "a.py::one", "a.py::two"]
  untouched = [_item(i) for i in ids]
  scheduling.heaviest_files_first(untouched, {})  # nothing recorded: collection order
  assert [i.nodeid for i in untouched] == ids


def test_a_recording_updates_its_tests_and_keeps_the_others(tmp_path):
  path = str(tmp_path / "seconds.json")
  scheduling.merge(path, {"a.py::one": 1.234, "b.py::slow": 9.0})
  scheduling.merge(path, {"a.py::one": 2.0})  # a fast-suite run: the slow test's seconds stay
  assert json.loads(open(path).read()) == {"a.py::one": 2.0, "b.py::slow": 9.0}
  assert not (tmp_path / "seconds.json.part").exists()

"""benchmarks/iteration.py --merge: the GPU check times each mode in its own process; the merge joins their JSON
files and prints the speed-ups one run would have printed. No model is built."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _merge(*args):
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "benchmarks", "iteration.py"), "--merge", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=120,
  )


def _write(path, results):
  path.write_text(json.dumps(results))
  return str(path)


def _row(s):
  return {"s_per_iter": s, "sequential_unet_calls": 100.0, "flop_efficiency": 0.9}


def test_merge_joins_modes_and_prints_their_speed_ups(tmp_path):
  files = [
    _write(tmp_path / "a.json", {"pytorch": _row(8.0)}),
    _write(tmp_path / "b.json", {"online_sequential": _row(4.0)}),
    _write(tmp_path / "c.json", {"online": _row(1.0), "bank": _row(0.5), "bank_renewing": _row(0.6)}),
  ]
  out = _merge(*files, f"--json={tmp_path / 'all.json'}")
  assert out.returncode == 0, out.stderr
  assert "speed-up online vs pytorch: 8.00x" in out.stdout
  assert "speed-up online vs online_sequential: 4.00x" in out.stdout
  assert "bank_renewing / bank time: 1.20x" in out.stdout
  assert json.loads((tmp_path / "all.json").read_text())["bank"] == _row(0.5)


def test_merge_refuses_a_repeated_mode_and_a_foreign_file(tmp_path):
  a = _write(tmp_path / "a.json", {"online": _row(1.0)})
  again = _merge(a, _write(tmp_path / "b.json", {"online": _row(2.0)}))
  assert again.returncode == 2 and "Traceback" not in again.stderr
  assert "--merge " + str(tmp_path / "b.json") + ": expected" in again.stderr
  foreign = _merge(_write(tmp_path / "c.json", {"loss": 0.1}))
  assert foreign.returncode == 2 and "c.json: expected" in foreign.stderr and "Traceback" not in foreign.stderr
  (tmp_path / "d.json").write_text("{not json")
  broken = _merge(str(tmp_path / "d.json"))
  assert broken.returncode == 2 and "d.json: cannot read it as JSON" in broken.stderr

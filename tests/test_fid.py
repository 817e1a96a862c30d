"""Inception FID parity: our Flax FID Inception-v3, fed through the same converter that loads pytorch-fid's
`.pth`, against a torch.nn transcription of pytorch-fid's network with random weights (tolerances in the asserts:
features within 1e-4 relative, FID within 1e-3 relative)."""

import numpy as np
import pytest

from advunlearn_jax.convert import inception as convert
from advunlearn_jax.errors import ConfigError, WeightsError
from advunlearn_jax.evals import fid

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
  """A pytorch-fid-layout `.pth` with random weights, as torch.save writes it (num_batches_tracked included)."""
  from tests.inception_torch import random_fid_inception

  model = random_fid_inception(seed=0)
  path = str(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")
  torch.save(model.state_dict(), path)
  return path, model


def _image_sets():
  """Two sets of smooth random images (upsampled noise, so features vary like those of photographs), of
  sizes below and above 299 and not square, so the resize is exercised both ways."""
  rng = np.random.default_rng(0)

  def smooth(h, w, n):
    coarse = rng.uniform(0, 255, (n, h // 8 + 1, w // 8 + 1, 3))
    return [np.kron(c, np.ones((8, 8, 1)))[:h, :w].astype(np.uint8) for c in coarse]

  return smooth(96, 128, 8), smooth(352, 320, 8)


def _torch_features(model, images):
  x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
  with torch.no_grad():
    return model(x).numpy().astype(np.float64)


def test_resize_matches_torch_interpolate():
  import torch.nn.functional as F

  rng = np.random.default_rng(1)
  for h, w in [(37, 53), (512, 512), (299, 299), (480, 640)]:
    image = rng.uniform(0, 1, (h, w, 3)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(299, 299), mode="bilinear")
    # Same taps and weights; only the float32 rounding of the weighted sums may differ (a few ulps).
    np.testing.assert_allclose(fid.resize_bilinear(image, 299), ref[0].permute(1, 2, 0).numpy(), atol=5e-7)


def test_features_and_fid_match_pytorch_fid_transcription(pth):
  path, model = pth
  ours = fid.InceptionFeatures(path, "pytorch_fid", batch_size=4)  # the batch of the tests below: one compiled network
  set_a, set_b = _image_sets()
  feats = {}
  for name, images in (("a", set_a), ("b", set_b)):
    ref = _torch_features(model, images)
    got = ours(images).astype(np.float64)
    assert got.shape == (len(images), 2048)
    assert ref.std() > 0.05  # the random network keeps features away from zero
    np.testing.assert_array_less(np.abs(got - ref).max() / np.abs(ref).max(), 1e-4)
    feats[name] = (got, ref)
  ours_fid = fid.frechet_distance(*fid.statistics(feats["a"][0]), *fid.statistics(feats["b"][0]))
  ref_fid = fid.frechet_distance(*fid.statistics(feats["a"][1]), *fid.statistics(feats["b"][1]))
  assert ref_fid > 1.0
  assert ours_fid == pytest.approx(ref_fid, rel=1e-3)


def _t2ibenchmark_transcription(image: np.ndarray) -> np.ndarray:
  """T2IBenchmark's InceptionV3FE preprocessing, transcribed (utils/resizers.py `crop_center` and
  `Resizer("PIL", "bicubic", True, (299, 299), True)`; feature_extractors/inceptionV3_feature_extractor.py:
  ToTensor, then 2x - 1, which our network does itself), returned as [0, 1] HWC."""
  from PIL import Image

  height, width = image.shape[:2]
  size = min(height, width)
  start_height, start_width = (height - size) // 2, (width - size) // 2
  img = image[start_height : start_height + size, start_width : start_width + size]
  x = Image.fromarray(img).resize((299, 299), resample=Image.BICUBIC)
  x = np.asarray(x).clip(0, 255).astype(np.uint8)
  return torch.from_numpy(x).permute(2, 0, 1).float().div(255).permute(1, 2, 0).numpy()


def test_t2ibenchmark_preprocessing_matches_its_resizer_on_non_square_images(pth):
  """Bit for bit on wide, tall, odd-sized, small and large images; then the features through both pipelines
  (ours against the torch network on the transcription's inputs), and the two preprocessings disagree."""
  rng = np.random.default_rng(2)
  images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(37, 80), (513, 300), (299, 420), (64, 64)]]
  for image in images:
    np.testing.assert_array_equal(fid.t2ibenchmark_input(image, 299), _t2ibenchmark_transcription(image))
  path, model = pth
  ours = fid.InceptionFeatures(path, "t2ibenchmark", batch_size=4)(images).astype(np.float64)
  ref = _torch_features(model, [(255 * _t2ibenchmark_transcription(im)).round().astype(np.uint8) for im in images])
  np.testing.assert_array_less(np.abs(ours - ref).max() / np.abs(ref).max(), 1e-4)
  other = fid.InceptionFeatures(path, "pytorch_fid", batch_size=4)(images).astype(np.float64)
  assert np.abs(other - ours).max() / np.abs(ours).max() > 1e-2  # the crop and the filter change the features
  with pytest.raises(ConfigError, match="fid_preprocess is 'clean'; expected one of"):
    fid.InceptionFeatures(path, "clean")


def test_expected_keys_are_pytorch_fids_state_dict(pth):
  _, model = pth
  published = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
  assert convert.expected_keys() == published
  # 94 conv layers (weight + 4 BatchNorm tensors each) and the 1008-way classifier, as in pytorch-fid's file.
  assert len(published) == 94 * 5 + 2
  assert published["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)


def test_safetensors_and_legacy_pth_load_the_same_variables(pth, tmp_path):
  path, model = pth
  legacy = str(tmp_path / "legacy.pth")  # pytorch-fid's 2019 file predates torch's zip format
  torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
  converted = convert.convert(legacy, str(tmp_path / "cache" / convert.CACHE_FILE))
  a, b = convert.load_variables(path), convert.load_variables(converted)
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(flat_a[key], flat_b[key])


def _flat(tree):
  from flax import traverse_util

  return traverse_util.flatten_dict(tree)


@pytest.mark.parametrize(
  "edit, message",
  [
    (lambda s: s.pop("Mixed_6b.branch7x7_2.bn.running_var"), "missing 1 key(s): Mixed_6b.branch7x7_2.bn.running_var"),
    (lambda s: s.update({"AuxLogits.fc.weight": np.zeros((1008, 768))}), "unexpected 1 key(s): AuxLogits.fc.weight"),
    (lambda s: s.update({"fc.weight": np.zeros((1000, 2048))}), "'fc.weight' has shape (1000, 2048)"),
  ],
  ids=["missing", "unexpected", "torchvision-imagenet-head"],
)
def test_converter_refuses_a_wrong_file(pth, tmp_path, edit, message):
  path, _ = pth
  state = convert.read(path)
  edit(state)
  bad = str(tmp_path / "bad.pth")
  torch.save({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}, bad)
  with pytest.raises(WeightsError) as e:
    convert.convert(bad, str(tmp_path / "out.safetensors"))
  assert message in str(e.value) and "bad.pth" in str(e.value)
  assert not (tmp_path / "out.safetensors").exists()


def test_not_a_weight_file_is_a_clear_error(tmp_path):
  junk = tmp_path / "weights.safetensors"
  junk.write_bytes(b"not a safetensors file")
  with pytest.raises(WeightsError, match="cannot read as safetensors"):
    convert.load_variables(str(junk))
  with pytest.raises(WeightsError, match="do not exist"):
    convert.load_variables(str(tmp_path / "nope.pth"))


def test_fid_features_follow_the_config(pth, tmp_path, monkeypatch):
  monkeypatch.setenv("ADVUNLEARN_CACHE", str(tmp_path / "empty_cache"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  lines, scorer = [], object()
  chosen = fid.feature_extractor("auto", "", scorer, lines.append)  # no weights anywhere: CLIP, said plainly
  assert chosen.name == "clip" and "not on the paper's scale" in lines[0]
  with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
    fid.feature_extractor("inception", "", scorer)
  with pytest.raises(ConfigError, match="or, for FID on CLIP features, evaluation.clip_model"):
    fid.feature_extractor("auto", "", None)
  with pytest.raises(ConfigError, match="does not exist"):
    fid.feature_extractor("auto", str(tmp_path / "nope.pth"), scorer)
  cached = convert.convert(pth[0], convert.cached_path())  # what `python -m advunlearn_jax.tools.fetch_inception` does
  assert cached.startswith(str(tmp_path / "empty_cache"))
  assert fid.feature_extractor("auto", "", scorer).name == "inception"
  assert fid.feature_extractor("clip", "", scorer).name == "clip"

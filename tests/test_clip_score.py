"""CLIP score parity: our Flax text + vision towers and preprocessing against transformers' PyTorch CLIPModel
and CLIPImageProcessor on a small random config with the real ViT layout (tolerances in the asserts)."""

import numpy as np
import pytest

from advunlearn_jax.data import tokenizer as tok_lib
from advunlearn_jax.errors import ConfigError, WeightsError
from advunlearn_jax.evals import clip_score

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  from tests import torch_oracles

  folder = str(tmp_path_factory.mktemp("clip"))
  return folder, torch_oracles.write_clip_model(folder)


def _images(n=5, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(64, 48), (48, 64), (32, 32), (50, 70), (40, 40)]
  return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]


def test_preprocessing_matches_clip_image_processor(clip_folder):
  folder, _ = clip_folder
  processor = transformers.AutoImageProcessor.from_pretrained(folder)
  ours = clip_score.Preprocess(folder, 32)
  for image in _images():
    ref = processor(images=[image], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours(image[None])[0], ref, atol=1e-5)


def test_clip_cosines_match_transformers(clip_folder):
  folder, model = clip_folder
  scorer = clip_score.CLIPScorer(folder)
  processor = transformers.AutoImageProcessor.from_pretrained(folder)
  images = np.stack([im[:32, :32] for im in _images(4, seed=1)])
  captions = ["a photo of a church", "a red triangle", "", "a painting in the style of van gogh"]
  ids = torch.tensor(tok_lib.tokenize(tok_lib.load_tokenizer(None), captions), dtype=torch.long)
  pixels = torch.tensor(processor(images=list(images), return_tensors="np")["pixel_values"])
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels)
  ref = (out.logits_per_image.diagonal() / model.logit_scale.exp()).detach().numpy()
  ours = scorer.cosines(images, captions, chunk=3)
  np.testing.assert_allclose(ours, ref, atol=2e-5)
  assert scorer.score(images, captions) == pytest.approx(float(ref.mean()), abs=2e-5)
  with pytest.raises(ValueError, match="4 images for 3 captions"):
    scorer.cosines(images, captions[:3])


def test_bad_clip_folders_say_what_is_wrong(tmp_path, clip_folder):
  with pytest.raises(WeightsError, match="not a folder"):
    clip_score.CLIPScorer(str(tmp_path / "missing"))
  (tmp_path / "config.json").write_text('{"hidden_size": 32}')
  with pytest.raises(ConfigError, match="needs 'text_config' and 'vision_config'"):
    clip_score.CLIPScorer(str(tmp_path))


def test_frechet_distance_closed_form_and_identity():
  from advunlearn_jax.evals import fid

  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
  d1, d2 = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(d1 + d2 - 2 * np.sqrt(d1 * d2))  # diagonal Gaussians
  assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-9)
  feats = rng.normal(size=(200, 8))
  assert abs(fid.frechet_distance(*fid.statistics(feats), *fid.statistics(feats))) < 1e-6
  shifted = fid.frechet_distance(*fid.statistics(feats), *fid.statistics(feats + 1.0))
  assert shifted == pytest.approx(8.0, rel=1e-6)  # a mean shift of 1 in each of 8 dimensions
  with pytest.raises(ValueError, match="at least 2 feature vectors"):
    fid.statistics(feats[:1])


def test_real_image_folder_errors(tmp_path):
  from advunlearn_jax.evals import fid

  with pytest.raises(ConfigError, match=r"config.evaluation.real_images: image folder .*nope' does not exist"):
    fid.open_images(str(tmp_path / "nope"), "evaluation.real_images")
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(ConfigError, match=r"config.evaluation.real_images=.*: no images \(.png, .jpg"):
    fid.open_images(str(tmp_path), "evaluation.real_images")

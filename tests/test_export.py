"""The reference's checkpoint layout: what UnlearnDiffAtk and AdvUnlearn's own scripts load (spec section 5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advunlearn_jax.convert import clip_text as convert
from advunlearn_jax.models.clip_text import CLIPTextModel
from advunlearn_jax.testing.reference_torch import CustomTextEncoder, LegacyCLIPTextModel
from tests.torch_oracles import SD1_TINY, state_numpy, torch, torch_clip

pytestmark = pytest.mark.torch


def test_reference_export_loads_strictly_into_the_reference_wrapper(tmp_path):
  config = SD1_TINY
  trained = torch_clip(config, seed=2)
  params = convert.params_from_state_dict(state_numpy(trained), config, source="test")
  path = convert.export_reference_checkpoint(
    config, params, str(tmp_path / "TextEncoder-text_encoder_full-epoch_999.pt")
  )
  state = torch.load(path, map_location="cpu", weights_only=True)

  # UnlearnDiffAtk: CustomTextEncoder(...).load_state_dict(file). Strict here, so a missing or extra key fails,
  # into a wrapper with other weights, so every tensor must come from the file.
  wrapper = CustomTextEncoder(torch_clip(config, seed=7))
  wrapper.load_state_dict(state, strict=True)
  expected = CustomTextEncoder(trained).state_dict()
  assert list(state) and set(state) == set(expected)
  for key, value in wrapper.state_dict().items():
    np.testing.assert_array_equal(value.numpy(), expected[key].numpy(), err_msg=key)
  # Each alias shares its tensor with the primary name, as torch.save of the wrapper stores it: one copy on disk.
  primary = state["text_encoder.text_model.encoder.layers.0.mlp.fc1.weight"]
  assert state["encoder.layers.0.mlp.fc1.weight"].data_ptr() == primary.data_ptr()
  assert (
    state["embedding.token_embedding.weight"].data_ptr()
    == state["text_encoder.text_model.embeddings.token_embedding.weight"].data_ptr()
  )

  # The loaded wrapper encodes word embeddings as our encoder does.
  ids = np.full((2, 77), 49407, np.int64)
  ids[:, 0], ids[0, 1:4], ids[1, 1:2] = 49406, [320, 1125, 539], 1929
  table = params["embeddings"]["token_embedding"]["embedding"]
  embeds = np.array(jax.nn.one_hot(ids, config.vocab_size) @ table)
  with torch.no_grad():
    ours = wrapper(torch.from_numpy(ids), torch.from_numpy(embeds)).numpy()
  flax_out = CLIPTextModel(config).apply({"params": params}, jnp.asarray(ids), inputs_embeds=jnp.asarray(embeds))
  np.testing.assert_allclose(ours, flax_out.last_hidden_state, atol=1e-5, rtol=0)

  # AdvUnlearn's generate-example-img.py keeps the `text_encoder.text_model` keys and strips `text_encoder.`.
  kept = {k.removeprefix("text_encoder."): v for k, v in state.items() if "text_encoder.text_model" in k}
  LegacyCLIPTextModel(torch_clip(config, seed=9)).load_state_dict(kept, strict=True)

  # And our own reader takes it back exactly.
  jax.tree.map(np.testing.assert_array_equal, convert.load_reference_checkpoint(path, config), params)
  assert not list(tmp_path.glob("*.partial"))

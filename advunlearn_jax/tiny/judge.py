"""The tiny world's judge: a small CNN naming the shape, colour and style of a 32x32 image.

It plays the part NudeNet, ResNet-50 and the style ViT play for Stable Diffusion: the detector that turns
generated images into recognition rates. Shipped as `assets/judge/` (config.json + model.safetensors).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from advunlearn_jax.convert import weights_io
from advunlearn_jax.errors import WeightsError
from advunlearn_jax.tiny import world

HEADS = {"shape": world.SHAPES, "color": world.COLORS, "style": world.STYLES}


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  channels: tuple[int, ...] = (16, 32, 64)
  hidden: int = 64


class Judge(nn.Module):
  config: JudgeConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: [B, 32, 32, 3] in [-1, 1] -> logits per head."""
    x = images
    for i, ch in enumerate(self.config.channels):
      x = nn.gelu(nn.Conv(ch, (3, 3), name=f"conv{i}a")(x))
      x = nn.gelu(nn.Conv(ch, (3, 3), name=f"conv{i}b")(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.gelu(nn.Dense(self.config.hidden, name="fc")(x.reshape(x.shape[0], -1)))
    return {name: nn.Dense(len(values), name=f"head_{name}")(x) for name, values in HEADS.items()}


@functools.partial(jax.jit, static_argnums=0)
def _logits(config: JudgeConfig, params: Any, images: jax.Array) -> dict[str, jax.Array]:
  return Judge(config).apply({"params": params}, images)


def predict(config: JudgeConfig, params: Any, images: np.ndarray, batch: int = 256) -> dict[str, np.ndarray]:
  """Class indices per head for uint8 [N, H, W, 3] images (or floats in [-1, 1])."""
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 127.5 - 1
  out: dict[str, list] = {k: [] for k in HEADS}
  for i in range(0, len(images), batch):
    logits = _logits(config, params, jnp.asarray(images[i : i + batch]))
    for k in HEADS:
      out[k].append(np.asarray(jnp.argmax(logits[k], -1)))
  return {k: np.concatenate(v) for k, v in out.items()}


def train(
  images: np.ndarray, attrs: world.Attributes, *, steps: int, seed: int, batch: int = 64, lr: float = 2e-3
) -> tuple[JudgeConfig, Any]:
  config = JudgeConfig()
  model = Judge(config)
  params = model.init(jax.random.key(seed), jnp.zeros((1, world.SIZE, world.SIZE, 3)))["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps), weight_decay=1e-4)
  opt_state = tx.init(params)
  labels = np.stack(attrs, -1)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return sum(
        optax.softmax_cross_entropy_with_integer_labels(logits[k], y[:, i]).mean() for i, k in enumerate(HEADS)
      )

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(len(images), size=batch)
    params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
    if i % 200 == 0:
      print(f"judge step {i}: loss {float(loss):.4f}", flush=True)
  return config, params


def accuracy(config: JudgeConfig, params: Any, images: np.ndarray, attrs: world.Attributes) -> dict[str, float]:
  pred = predict(config, params, images)
  return {k: float(np.mean(pred[k] == np.asarray(a))) for k, a in zip(HEADS, attrs)}


def save(out_dir: str, config: JudgeConfig, params: Any, metrics: dict[str, Any]) -> None:
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  with weights_io.atomic_folder(out_dir) as staging:
    weights_io.write_json(os.path.join(staging, "config.json"), {**dataclasses.asdict(config), "metrics": metrics})
    weights_io.write_safetensors(os.path.join(staging, "model.safetensors"), flat)


def load(folder: str) -> tuple[JudgeConfig, Any]:
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise WeightsError(f"{folder}: no config.json; expected the judge folder written by advunlearn_jax.tiny.build")
  with open(path) as f:
    raw = json.load(f)
  config = JudgeConfig(channels=tuple(raw["channels"]), hidden=raw["hidden"])
  from safetensors.numpy import load_file

  flat = load_file(os.path.join(folder, "model.safetensors"))
  abstract = jax.eval_shape(Judge(config).init, jax.random.key(0), jnp.zeros((1, world.SIZE, world.SIZE, 3)))["params"]
  expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
  if expected.keys() != flat.keys() or any(flat[k].shape != s for k, s in expected.items()):
    raise WeightsError(f"{folder}/model.safetensors does not match the judge config in {path}")
  return config, traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")

"""A procedural world of 32x32 pictures: coloured, textured shapes on varied backgrounds, with captions.

Served as a plain seeded numpy generator rather than a tensorflow_datasets builder: every image is a pure
function of (seed, index), rendering a batch of 256 takes milliseconds (faster than reading records back),
and it keeps TensorFlow and array_record out of the product's dependencies. `render(attrs, rng)` is the one
renderer, so the judge, the text-to-image model and the evaluations all see the same distribution.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from advunlearn_jax.errors import ConfigError

SIZE = 32
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
STYLES = ("plain", "striped", "dotted", "checkered")

_RGB = {
  "red": (0.88, 0.12, 0.12),
  "green": (0.12, 0.68, 0.22),
  "blue": (0.15, 0.30, 0.92),
  "yellow": (0.96, 0.86, 0.10),
  "purple": (0.58, 0.20, 0.78),
  "orange": (1.00, 0.55, 0.05),
}
# Words a caption may use for each value; the first is the canonical one that evaluation prompts use.
SHAPE_WORDS = {
  "circle": ("circle", "disc"),  # not "dot": the dotted style's "polka-dot" would name a shape too
  "square": ("square", "box"),
  "triangle": ("triangle",),
  "star": ("star",),
  "cross": ("cross", "plus sign"),
  "heart": ("heart",),
}
STYLE_WORDS = {
  "plain": ("plain", "solid"),
  "striped": ("striped", "stripy"),
  "dotted": ("dotted", "polka-dot"),
  "checkered": ("checkered", "checkerboard"),
}
_SUPERSAMPLE = 4  # anti-aliasing: masks are evaluated on a 4x finer grid and averaged
# Texture periods in pixels (the VAE's factor 4 makes 12 px three latent pixels). Stripes run horizontally and
# checks are 8 px squares so the two textures share no frequency component: with diagonal stripes, a checkerboard
# was the stripes plus their mirror image, both near the latent grid's Nyquist limit, and the UNet drew one for
# the other about half the time.
_PERIODS = {"striped": 12.0, "dotted": 12.0, "checkered": 16.0}


class Attributes(NamedTuple):
  """Indices into SHAPES, COLORS, STYLES; one entry per image."""

  shape: np.ndarray
  color: np.ndarray
  style: np.ndarray


def sample_attributes(rng: np.random.Generator, n: int) -> Attributes:
  return Attributes(
    rng.integers(len(SHAPES), size=n), rng.integers(len(COLORS), size=n), rng.integers(len(STYLES), size=n)
  )


def _star_vertices() -> np.ndarray:
  angles = -np.pi / 2 + np.arange(10) * np.pi / 5
  radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles) + 0.08], -1)


_POLYGONS = {
  "triangle": np.array([[0.0, -0.95], [0.95, 0.75], [-0.95, 0.75]]),
  "star": _star_vertices(),
}


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
  """Even-odd rule, vectorised over points."""
  inside = np.zeros(u.shape, bool)
  for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, axis=0)):
    crosses = (y0 > v) != (y1 > v)
    x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
    inside ^= crosses & (u < x_at)
  return inside


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """u, v: coordinates relative to the shape's centre in units of its radius (v points down)."""
  if shape == "circle":
    return u * u + v * v <= 0.9
  if shape == "square":
    return np.maximum(abs(u), abs(v)) <= 0.78
  if shape == "cross":
    return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))
  if shape == "heart":
    x, y = u * 1.15, -(v * 1.15) + 0.15
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
  return _inside_polygon(u, v, _POLYGONS[shape])


def _texture(style: str, x: np.ndarray, y: np.ndarray, phase: np.ndarray) -> np.ndarray:
  """1 where the pattern shows the shape's dark shade, 0 where it shows its colour; phase in periods."""
  if style == "plain":
    return np.zeros_like(x)
  px, py = x / _PERIODS[style] + phase[0], y / _PERIODS[style] + phase[1]
  if style == "striped":
    return (np.mod(py, 1.0) < 0.5).astype(np.float32)
  if style == "dotted":
    dx, dy = np.mod(px, 1.0) - 0.5, np.mod(py, 1.0) - 0.5
    return (dx * dx + dy * dy < 0.22**2 * 1.6).astype(np.float32)
  return ((np.floor(px * 2) + np.floor(py * 2)) % 2).astype(np.float32)


def render(attrs: Attributes, rng: np.random.Generator) -> np.ndarray:
  """float32 images [N, 32, 32, 3] in [0, 1]; position, size, rotation, background and shades are random."""
  n = len(attrs.shape)
  s = _SUPERSAMPLE
  grid = (np.arange(SIZE * s) + 0.5) / s
  ys, xs = np.meshgrid(grid, grid, indexing="ij")
  images = np.empty((n, SIZE, SIZE, 3), np.float32)
  for i in range(n):
    radius = rng.uniform(9.5, 13.0)
    cx, cy = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
    angle = rng.uniform(-0.25, 0.25)
    c, sn = np.cos(angle), np.sin(angle)
    du, dv = (xs - cx) / radius, (ys - cy) / radius
    u, v = c * du + sn * dv, -sn * du + c * dv
    mask = _shape_mask(SHAPES[attrs.shape[i]], u, v).astype(np.float32)
    pattern = _texture(STYLES[attrs.style[i]], xs - cx, ys - cy, rng.uniform(size=2))
    color = np.clip(np.array(_RGB[COLORS[attrs.color[i]]]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    dark = color * rng.uniform(0.25, 0.4)
    shade = color + pattern[..., None] * (dark - color)
    level = rng.uniform(0.72, 0.98)
    background = np.clip(level + rng.uniform(-0.04, 0.04, 3), 0, 1)
    image = background + mask[..., None] * (shade - background)
    images[i] = image.reshape(SIZE, s, SIZE, s, 3).mean(axis=(1, 3))
  return images


_TEMPLATES = (
  "a photo of a {style} {color} {shape}",
  "a {style} {color} {shape}",
  "{color} {shape}, {style} style",
  "a picture of a {color} {shape} with a {style} pattern",
  "an image of a {style} {shape} in {color}",
)


def caption(shape: int, color: int, style: int, rng: np.random.Generator, drop: float = 0.15) -> str:
  """One caption naming the shape always and colour/style each with probability 1 - drop, so that the model
  also learns what a prompt leaves open."""
  shape_word = str(rng.choice(SHAPE_WORDS[SHAPES[shape]]))
  color_word = COLORS[color] if rng.random() >= drop else ""
  style_word = str(rng.choice(STYLE_WORDS[STYLES[style]])) if rng.random() >= drop else ""
  template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
  if not style_word:
    template = template.replace(", {style} style", "").replace(" with a {style} pattern", "")
  text = template.format(shape=shape_word, color=color_word, style=style_word)
  if not color_word and text.endswith(" in "):
    text = text[: -len(" in ")]
  return " ".join(text.split())  # collapse the gaps dropped words leave


def canonical_prompt(shape: int | None = None, color: int | None = None, style: int | None = None) -> str:
  """The evaluation phrasing: 'a photo of a striped red triangle' (omitted attributes left out)."""
  words = [STYLES[style] if style is not None else "", COLORS[color] if color is not None else ""]
  words.append(SHAPES[shape] if shape is not None else "shape")
  return "a photo of a " + " ".join(w for w in words if w)


def batch(seed: int, index: int, n: int) -> tuple[np.ndarray, Attributes, list[str]]:
  """Images in [-1, 1], their attributes and captions: batch `index` of the stream seeded by `seed`."""
  rng = np.random.default_rng([seed, index])
  attrs = sample_attributes(rng, n)
  images = render(attrs, rng) * 2 - 1
  captions = [caption(a, b, c, rng) for a, b, c in zip(*attrs)]
  return images, attrs, captions


ATTRIBUTE_TYPES = {"shape": SHAPES, "color": COLORS, "style": STYLES}


def attribute_of(value: str) -> tuple[str, int]:
  """('shape', 2) for 'triangle': the attribute type a value belongs to and its index."""
  for kind, values in ATTRIBUTE_TYPES.items():
    if value in values:
      return kind, values.index(value)
  raise ConfigError(f"{value!r} is not a tiny-world value; known: {ATTRIBUTE_TYPES}")


def other_values(value: str) -> list[str]:
  """The other values of `value`'s attribute ('striped' -> plain, dotted, checkered): what an erasure of it
  should keep."""
  kind, index = attribute_of(value)
  return [v for i, v in enumerate(ATTRIBUTE_TYPES[kind]) if i != index]


def attribute_prompts(kind: str, value: int, n: int) -> list[str]:
  """n prompts naming attribute `kind` = value, the other attributes cycling through their values."""
  out = []
  for i in range(n):
    # Distinct combinations of the other two attributes for the first 12 prompts, whichever kind is fixed.
    attrs = {"shape": i % len(SHAPES), "color": (i + i // len(COLORS)) % len(COLORS), "style": i % len(STYLES)}
    attrs[kind] = value
    out.append(canonical_prompt(**attrs))
  return out


def words_of(value: str) -> tuple[str, ...]:
  """Every word the captions use for a value ('striped', 'stripy'): what a sensitive-word filter bans."""
  kind, _ = attribute_of(value)
  return {"shape": SHAPE_WORDS, "style": STYLE_WORDS}.get(kind, {value: (value,)})[value]

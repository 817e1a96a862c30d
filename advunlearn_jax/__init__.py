"""AdvUnlearn in JAX/Flax: robust concept erasure for text-to-image diffusion models."""

__version__ = "0.1.0"

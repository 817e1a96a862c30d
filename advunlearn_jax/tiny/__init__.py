"""The tiny world: a procedural image world, a text-to-image model trained on it, and a judge."""

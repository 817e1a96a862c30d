"""Text and image inputs: the CLIP tokenizer, TFDS captions and images, image files read on demand."""

"""The model input of one image: resized, then ImageNet-normalised.

Resizing lives in `maeday_jax.resizing`, the normalisation in `maeday_jax.imagenet`;
`normalize` stays importable from here for the modules that import it from this one.
"""

from __future__ import annotations

import numpy as np

from maeday_jax.imagenet import normalize
from maeday_jax.resizing import resize_image, short_side_size


def preprocess_image(image: np.ndarray, size) -> np.ndarray:
  """uint8 (h, w, 3) at any size -> normalised float32 (size, size, 3) model input (or
  (h', w', 3) for a `(height, width)` pair)."""
  return normalize(resize_image(image, size))


def preprocess_keeping_aspect(image: np.ndarray, short_side: int) -> np.ndarray:
  """uint8 (h, w, 3) -> normalised float32 with its aspect ratio kept: its short side
  resized to `short_side` px, or at its own size for -1 (tiled scoring at native size)."""
  return normalize(resize_image(image, short_side_size(*image.shape[:2], short_side)))

"""The model input of one image: resized, then ImageNet-normalised.

Resizing lives in `maeday_jax.resizing`, the normalisation in `maeday_jax.imagenet`;
`normalize` stays importable from here for the modules that import it from this one.
"""

from __future__ import annotations

import numpy as np

from maeday_jax.imagenet import normalize
from maeday_jax.resizing import resize_image


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (h, w, 3) at any size -> normalised float32 (size, size, 3) model input."""
  return normalize(resize_image(image, size))

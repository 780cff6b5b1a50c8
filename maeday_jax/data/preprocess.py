"""The model input of one image: resized, then ImageNet-normalised.

Resizing lives in `maeday_jax.resizing`, the normalisation in `maeday_jax.imagenet`;
`normalize` stays importable from here for the modules that import it from this one.
"""

from __future__ import annotations

import numpy as np

from maeday_jax.data.errors import ImageTooLarge
from maeday_jax.data.images import pixel_budget
from maeday_jax.imagenet import normalize
from maeday_jax.resizing import KeepAspect, resize_image


def preprocess_image(image: np.ndarray, size) -> np.ndarray:
  """uint8 (h, w, 3) at any size -> normalised float32 (size, size, 3) model input (or
  (h', w', 3) for a `(height, width)` pair; for a `resizing.KeepAspect`, the size it
  gives this image, within the per-image pixel budget).

  Raises:
    ImageTooLarge: the aspect-kept size (e.g. a 1 x 60,000 strip enlarged to a short side
      of 224 px) holds more pixels than the per-image budget.
  """
  if isinstance(size, KeepAspect):
    size = size.size(*image.shape[:2])
    pixels, budget = size[0] * size[1], pixel_budget()
    if pixels > budget:
      what = "image too large once resized with its aspect ratio kept"
      raise ImageTooLarge("image", pixels, budget, size[::-1], what=what)
  return normalize(resize_image(image, size))

"""Every resize of the project: images and masks for the model, maps and masks for metrics.

NumPy and Pillow only. Four functions, because four different arithmetics are in use and
each caller's outputs (batches, metrics, `maps/*.npz`, pictures) must stay as they are:

- `resize_image`: uint8 RGB images to the model's input, Pillow's bilinear filter in its
  8-bit arithmetic (it widens its support when shrinking, so it antialiases). The aspect
  ratio is not kept: the model takes square inputs (spec section 1, 224 x 224).
- `resize_mask_pillow`: one ground-truth mask beside its image in the input pipeline,
  Pillow's NEAREST, values kept (uint8 {0, 1} stays {0, 1}).
- `resize_masks_bool`: masks to the evaluation resolution for the metrics and pictures,
  binarised (`> 0`) and sampled at pixel centres with exact NumPy arithmetic, a whole
  batch at once. Pillow computes the same pixel-centre positions by repeated addition,
  so where a centre falls exactly on a pixel boundary (e.g. 2 -> 7 rows) it can pick the
  other neighbour: the two are not interchangeable.
- `resize_maps_bilinear`: anomaly maps, Pillow's bilinear filter on float32 ("F" mode),
  for the metrics' `resolution`, the maps saved at the image's own size (spec section 1,
  step 4) and the pictures.

Sizes are `(height, width)` or one int for a square (see `as_size`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image


def as_size(size) -> tuple[int, int] | None:
  """`(height, width)` as ints from an int (a square) or a pair; None stays None."""
  if size is None:
    return None
  if isinstance(size, int | np.integer):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


@dataclasses.dataclass(frozen=True)
class KeepAspect:
  """How an image is read with its aspect ratio kept (tiled scoring and training at the
  images' own size): its short side resized to `short_side` px (-1: its own size), and
  enlarged, if still below it, so that its short side is `min_side` (one tile)."""

  short_side: int
  min_side: int = 0

  def size(self, height: int, width: int) -> tuple[int, int]:
    """The (h, w) an image of (height, width) is read at."""
    height, width = short_side_size(height, width, self.short_side)
    if min(height, width) < self.min_side:
      return short_side_size(height, width, self.min_side)
    return height, width


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(h, w) of an image resized with its aspect ratio kept so that its short side is
  `short_side` px (rounded, each side at least 1); -1 keeps its own size."""
  if short_side == -1:
    return int(height), int(width)
  if short_side < 1:
    raise ValueError(f"short_side must be -1 or a size in pixels, got {short_side}")
  scale = short_side / min(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """Resizes uint8 (h, w, 3) to (size, size, 3) (or (h', w', 3) for a pair), bilinear.

  Returns `image` itself when it already has that size.
  """
  height, width = as_size(size)
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def resize_mask_pillow(mask: np.ndarray, size) -> np.ndarray:
  """Resizes a uint8 (h, w) {0, 1} mask with Pillow's NEAREST, so it stays binary.

  Returns `mask` itself when it already has that size.
  """
  height, width = as_size(size)
  if mask.shape == (height, width):
    return mask
  return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def resize_masks_bool(masks, size) -> np.ndarray:
  """Nearest-neighbour resize of masks (N, h, w) or (h, w) to `size`, as booleans (> 0)."""
  masks = np.asarray(masks) > 0
  out_h, out_w = as_size(size)
  in_h, in_w = masks.shape[-2:]
  rows = np.minimum(((np.arange(out_h) + 0.5) * in_h / out_h).astype(np.int64), in_h - 1)
  cols = np.minimum(((np.arange(out_w) + 0.5) * in_w / out_w).astype(np.int64), in_w - 1)
  return masks[..., rows[:, None], cols[None, :]]


def resize_float_image(image: np.ndarray, size) -> np.ndarray:
  """A float32 (h, w, C) image (e.g. normalised) resized to `size`, Pillow's bilinear
  filter on each channel (as `resize_maps_bilinear`); itself when it has that size."""
  size = as_size(size)
  if image.shape[:2] == size:
    return image
  return np.moveaxis(resize_maps_bilinear(np.moveaxis(image, -1, 0), size), 0, -1)


def resize_maps_bilinear(maps, size) -> np.ndarray:
  """Bilinear (Pillow) resize of anomaly maps (N, h, w) or (h, w) to `size`, float32."""
  maps = np.asarray(maps, dtype=np.float32)
  out_h, out_w = as_size(size)
  flat = maps.reshape(-1, *maps.shape[-2:])
  out = np.stack(
    [np.asarray(Image.fromarray(m).resize((out_w, out_h), Image.BILINEAR)) for m in flat]
  )
  return out.reshape(*maps.shape[:-2], out_h, out_w)

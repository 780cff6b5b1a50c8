"""Resizing and ImageNet normalisation, shared by the input pipeline and the pictures.

Images are resized straight to the model's square input (aspect ratio not kept, as in
MAEDAY) with Pillow's bilinear filter, which widens its support when shrinking and so
antialiases; masks use nearest neighbour so they stay binary.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)


def normalize(images: np.ndarray) -> np.ndarray:
  """Maps uint8 RGB images (..., 3) to float32 `(x / 255 - mean) / std`."""
  x = np.asarray(images, dtype=np.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(x: np.ndarray) -> np.ndarray:
  """Inverse of `normalize`: float32 (..., 3) in the model's space -> uint8 RGB (clipped)."""
  pixels = (np.asarray(x, dtype=np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
  return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Resizes uint8 (h, w, 3) to (size, size, 3) (or (h', w', 3) for a pair), bilinear."""
  height, width = (size, size) if isinstance(size, int) else size
  if image.shape[:2] == (height, width):
    return image
  return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """Resizes a uint8 (h, w) {0, 1} mask with nearest neighbour, so it stays binary."""
  height, width = (size, size) if isinstance(size, int) else size
  if mask.shape == (height, width):
    return mask
  return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def preprocess_image(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 (h, w, 3) at any size -> normalised float32 (size, size, 3) model input."""
  return normalize(resize_image(image, size))

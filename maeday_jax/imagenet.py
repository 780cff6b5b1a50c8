"""ImageNet mean/std normalisation, the pixel space of the MAE models (spec section 1).

One home for the constants and the mapping, used by the input pipeline (NumPy, on the
host) and by pre-training's on-device augmentation (JAX, inside the jitted step). Each
function computes with the namespace of the array it is given, in float32: NumPy in,
NumPy out; a JAX array or tracer in, JAX out. JAX is never imported here: a JAX array
can only exist once JAX has been imported.
"""

from __future__ import annotations

import sys

import numpy as np

IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)


def _namespace(x):
  """`jax.numpy` for JAX arrays (and tracers), `numpy` for everything else."""
  jax = sys.modules.get("jax")
  if jax is not None and isinstance(x, jax.Array):
    return sys.modules["jax.numpy"]
  return np


def normalize(images):
  """Maps uint8 RGB images (..., 3) to float32 `(x / 255 - mean) / std`."""
  xp = _namespace(images)
  x = xp.asarray(images, dtype=xp.float32) / 255.0
  return (x - xp.asarray(IMAGENET_MEAN)) / xp.asarray(IMAGENET_STD)


def denormalize(x):
  """Inverse of `normalize`: float32 (..., 3) in the model's space -> uint8 RGB (clipped)."""
  xp = _namespace(x)
  pixels = (
    xp.asarray(x, dtype=xp.float32) * xp.asarray(IMAGENET_STD) + xp.asarray(IMAGENET_MEAN)
  ) * 255.0
  return xp.clip(xp.rint(pixels), 0, 255).astype(xp.uint8)

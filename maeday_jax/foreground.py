"""Zero-shot foreground masks from patch features: the first principal component.

Objects on a plain background separate along the first principal component of their
patch tokens (AnomalyDINO's masking, as anomalib computes it): a patch is foreground where
its projection exceeds `threshold`; if the centre of the image (the middle 60 %) is mostly
background the component's sign is flipped; the mask is then dilated and closed with a
3 x 3 window. Everything runs on device per image (an eigendecomposition of the C x C
covariance), so masking stays inside a jitted score function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

THRESHOLD = 10.0
BORDER = 0.2
CENTER_FRACTION = 0.35


def first_component(features: jax.Array) -> jax.Array:
  """Projections (N,) of the centred rows of `features` (N, C) on their first principal
  axis, signed as scikit-learn's PCA signs it (the axis' largest entry positive)."""
  x = features.astype(jnp.float32)
  centred = x - x.mean(axis=0)
  covariance = centred.T @ centred
  _, vectors = jnp.linalg.eigh(covariance)
  axis = vectors[:, -1]
  axis = axis * jnp.sign(axis[jnp.argmax(jnp.abs(axis))])
  return centred @ axis


def _morphology(mask: jax.Array, op, init) -> jax.Array:
  padded = jnp.pad(mask, 1, constant_values=init)
  return jax.lax.reduce_window(padded, init, op, (3, 3), (1, 1), "VALID")


def foreground_mask(
  features: jax.Array, threshold: float = THRESHOLD, border: float = BORDER
) -> jax.Array:
  """Boolean (h, w) foreground of one image's patch features (h, w, C)."""
  rows, cols, _ = features.shape
  projection = first_component(features.reshape(rows * cols, -1)).reshape(rows, cols)
  top, bottom = int(rows * border), int(rows * (1 - border))
  left, right = int(cols * border), int(cols * (1 - border))

  def centre_is_background(mask):
    centre = mask[top:bottom, left:right]
    return centre.sum() <= centre.size * CENTER_FRACTION

  mask = projection > threshold
  mask = jnp.where(centre_is_background(mask), -projection > threshold, mask)
  as_float = mask.astype(jnp.float32)
  dilated = _morphology(as_float, jax.lax.max, 0.0)
  # Closing = dilation then erosion; outside the image counts as foreground for the
  # erosion (OpenCV's default border), so borders are not eaten.
  closed = _morphology(_morphology(dilated, jax.lax.max, 0.0), jax.lax.min, 1.0)
  return closed > 0.5


def foreground_masks(features: jax.Array, **kwargs) -> jax.Array:
  """`foreground_mask` of every image of a batch (B, h, w, C) -> (B, h, w)."""
  return jax.vmap(lambda f: foreground_mask(f, **kwargs))(features)

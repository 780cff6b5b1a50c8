"""The few-shot objective: reconstruction error of every patch, and its held-out measure."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax import parallel
from maeday_jax.data.preprocess import normalize
from maeday_jax.models import MaskedAutoencoder, masking
from maeday_jax.objectives import losses


def reconstruction_loss(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  mask_ratio: float = 0.75,
) -> jax.Array:
  """MSE between the reconstruction of every patch and the pixels, as a scalar.

  `images` (B, H, W, 3) normalised; `noise` (B, L) sets the masks. Unlike MAE
  pre-training, visible patches count too and there is no per-patch normalisation of the
  target: scoring compares raw reconstructions to raw pixels over the whole image.
  """
  _, error = losses.reconstruction_errors(model, params, images, noise, mask_ratio)
  return jnp.mean(error)


def as_model_input(model: MaskedAutoencoder, images) -> jax.Array:
  """Checks (k, S, S, 3) images at the model size; normalises uint8 ones (ImageNet stats)."""
  shape = np.shape(images)
  size = model.img_size
  if len(shape) != 4 or shape[1:] != (size, size, model.in_chans):
    raise ValueError(
      f"Expected images of shape (k, {size}, {size}, {model.in_chans}) for this model, got "
      f"{shape}. Resize and normalise them with the data pipeline first (or pass uint8 "
      "RGB at the model size)."
    )
  if shape[0] == 0:
    raise ValueError("No images given: few-shot adaptation needs at least one shot.")
  dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
  if dtype == np.uint8:
    return jnp.asarray(normalize(np.asarray(images)))
  return jnp.asarray(images, jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "mask_ratio", "num_masks", "mesh"))
def _heldout_loss(params, images, key, *, model, mask_ratio, num_masks, mesh):
  rows = images.shape[0] * num_masks
  noise = masking.random_noise(key, (rows,), model.num_patches)
  images = jnp.repeat(images, num_masks, axis=0)  # image b, mask m at row b * M + m
  if rows % mesh.devices.size == 0:  # Split the work when it divides evenly.
    images, noise = jax.lax.with_sharding_constraint((images, noise), parallel.batch_sharded(mesh))
  return reconstruction_loss(model, params, images, noise, mask_ratio)


def heldout_loss(
  model: MaskedAutoencoder,
  params: Any,
  images,
  key: jax.Array,
  mask_ratio: float = 0.75,
  num_masks: int = 4,
  mesh=None,
) -> float:
  """Reconstruction loss on held-out normal images, averaged over `num_masks` masks each.

  The masks depend only on `key` and the number of images, so two parameter sets
  compared with the same key and images see the same masks. `images`: (B, H, W, 3)
  normalised, or uint8 RGB; all B * num_masks reconstructions run in one batch.
  Parameters are placed on `mesh` (default: all devices) first, so base and adapted
  parameters share one compilation whatever devices they came from.
  """
  mesh = parallel.data_mesh() if mesh is None else mesh
  images = parallel.replicate(as_model_input(model, images), mesh)
  params = parallel.replicate(params, mesh)
  loss = _heldout_loss(
    params, images, key, model=model, mask_ratio=mask_ratio, num_masks=num_masks, mesh=mesh
  )
  return float(loss)

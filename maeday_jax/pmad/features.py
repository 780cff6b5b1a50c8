"""Patch features on the reconstructor's patch grid: what PMAD's prototypes, its flow and
its `features` / `codebook` targets read.

A feature network (`models.load`: a ResNet's stages, a ViT's blocks) sees the images at
its own size; each chosen layer's map is brought to the reconstructor's grid (area
average when the grid divides it, antialiased bilinear otherwise) and the layers are
concatenated, so patch i of the reconstructor and row i of the features cover the same
pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def to_grid(maps: jax.Array, grid: int) -> jax.Array:
  """(B, h, w, C) -> (B, grid, grid, C): average pooling when `grid` divides h and w,
  antialiased bilinear resizing otherwise."""
  batch, h, w, channels = maps.shape
  if (h, w) == (grid, grid):
    return maps
  if h % grid == 0 and w % grid == 0:
    fh, fw = h // grid, w // grid
    return maps.reshape(batch, grid, fh, grid, fw, channels).mean(axis=(2, 4))
  return jax.image.resize(maps, (batch, grid, grid, channels), "linear", antialias=True)


def grid_features(
  net, images: jax.Array, layers: Sequence[int], grid: int, image_size: int = 0
) -> jax.Array:
  """(B, grid * grid, C) patch features of `net` (a `models.load` network) for ImageNet-
  normalised images (B, S, S, 3), seen by the network at `image_size` px (0: S)."""
  batch, size = images.shape[0], images.shape[1]
  if image_size and image_size != size:
    images = jax.image.resize(images, (batch, image_size, image_size, 3), "linear", antialias=True)
  tokens = net.patch_tokens(images, layers=tuple(layers))
  maps = [to_grid(tokens[i].astype(jnp.float32), grid) for i in tuple(layers)]
  return jnp.concatenate(maps, axis=-1).reshape(batch, grid * grid, -1)

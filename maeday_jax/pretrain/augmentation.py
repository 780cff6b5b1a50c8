"""On-device augmentation for MAE pre-training: random resized crop (or a random tile at
the image's resolution) and flips.

Pure functions of a PRNG key, vmapped over the batch inside the jitted train step, so
the host only ships uint8 images once per step.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from maeday_jax.imagenet import normalize


class CropBox(NamedTuple):
  """A crop of an image in pixels: top-left corner and size (floats, sub-pixel)."""

  top: jax.Array
  left: jax.Array
  height: jax.Array
  width: jax.Array


def sample_crop(
  key: jax.Array,
  image_hw: tuple[int, int],
  scale: tuple[float, float] = (0.2, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> CropBox:
  """Draws a crop like torchvision's `RandomResizedCrop`.

  Area fraction ~ U(scale), aspect ratio log-uniform in `ratio`, position uniform.
  torchvision retries a crop that does not fit and falls back to the centre; here the
  side that does not fit is clipped to the image instead, which keeps one draw per
  example (jit-friendly) and only changes the rare extreme-ratio large crops.
  """
  height, width = image_hw
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = jax.random.uniform(k_area, minval=scale[0], maxval=scale[1]) * height * width
  log_ratio = jax.random.uniform(k_ratio, minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
  aspect = jnp.exp(log_ratio)
  crop_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
  crop_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
  top = jax.random.uniform(k_top) * (height - crop_h)
  left = jax.random.uniform(k_left) * (width - crop_w)
  return CropBox(top, left, crop_h, crop_w)


def sample_tile(key: jax.Array, image_hw: tuple[int, int], size: int) -> CropBox:
  """A `size` x `size` window at a uniform random whole-pixel position: a tile at the
  image's own resolution, as tiled scoring sees it (`maeday_jax.tiling`). The image must
  be at least `size` on both sides."""
  height, width = image_hw
  k_top, k_left = jax.random.split(key)
  top = jax.random.randint(k_top, (), 0, height - size + 1).astype(jnp.float32)
  left = jax.random.randint(k_left, (), 0, width - size + 1).astype(jnp.float32)
  side = jnp.float32(size)
  return CropBox(top, left, side, side)


def random_tiles(key: jax.Array, images: jax.Array, size: int) -> jax.Array:
  """One random `size` x `size` window (whole pixels, no resampling) of each image of
  (B, H, W, C), row b's position drawn from `fold_in(key, b)`."""

  def one(row, image):
    box = sample_tile(jax.random.fold_in(key, row), image.shape[:2], size)
    start = (box.top.astype(jnp.int32), box.left.astype(jnp.int32), jnp.int32(0))
    return jax.lax.dynamic_slice(image, start, (size, size, image.shape[-1]))

  return jax.vmap(one)(jnp.arange(images.shape[0]), images)


def crop_and_resize(image: jax.Array, box: CropBox, size: int) -> jax.Array:
  """Resamples the crop `box` of `image` (H, W, C) to (size, size, C), bilinear.

  Antialiased when shrinking, like the Pillow resize of the input pipeline.
  """
  scale = jnp.stack([size / box.height, size / box.width])
  translation = -jnp.stack([box.top, box.left]) * scale
  return jax.image.scale_and_translate(
    image,
    (size, size, image.shape[-1]),
    spatial_dims=(0, 1),
    scale=scale,
    translation=translation,
    method="linear",
    antialias=True,
  )


def augment_image(
  key: jax.Array,
  image: jax.Array,
  size: int,
  crop_scale: tuple[float, float] = (0.2, 1.0),
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
  hflip: bool = True,
  vflip: bool = False,
  crop: str = "resized",
) -> jax.Array:
  """Random resized crop to `size` (`crop='resized'`) or a random `size` tile at the
  image's resolution (`crop='tile'`; `crop_scale` and `crop_ratio` unused), then random
  flips, of one float image (H, W, C)."""
  k_crop, k_h, k_v = jax.random.split(key, 3)
  if crop == "tile":
    box = sample_tile(k_crop, image.shape[:2], size)
  else:
    box = sample_crop(k_crop, image.shape[:2], crop_scale, crop_ratio)
  out = crop_and_resize(image, box, size)
  if hflip:
    out = jnp.where(jax.random.bernoulli(k_h), out[:, ::-1], out)
  if vflip:
    out = jnp.where(jax.random.bernoulli(k_v), out[::-1], out)
  return out


def augment_batch(key: jax.Array, images_u8: jax.Array, size: int, **options) -> jax.Array:
  """Augments uint8 images (B, H, W, C) to normalised float32 (B, size, size, C).

  Example b uses `fold_in(key, b)`; `options` are those of `augment_image`.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images_u8.shape[0]))
  # Normalising before resampling is the same as after (both are affine per channel).
  images = normalize(images_u8)
  return jax.vmap(lambda k, x: augment_image(k, x, size, **options))(keys, images)

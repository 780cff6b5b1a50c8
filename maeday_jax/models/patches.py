"""Conversion between images (B, H, W, C) and patch sequences (B, L, p*p*C).

The per-patch order is (row in patch, column in patch, channel), the official MAE
`patchify` order, so decoder outputs and pixel targets line up with the PyTorch release.
"""

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, (H/p)*(W/p), p*p*C)."""
  batch, height, width, channels = images.shape
  p = patch_size
  if height % p or width % p:
    raise ValueError(f"Image size {height}x{width} is not a multiple of patch size {p}.")
  h, w = height // p, width // p
  x = images.reshape(batch, h, p, w, p, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(batch, h * w, p * p * channels)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
  """(B, L, p*p*C) -> (B, H, W, C) for a square grid of L patches."""
  batch, num_patches, _ = patches.shape
  side = round(num_patches**0.5)
  if side * side != num_patches:
    raise ValueError(f"unpatchify needs a square patch grid, got L={num_patches}.")
  p = patch_size
  x = patches.reshape(batch, side, side, p, p, channels)
  x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
  return x.reshape(batch, side * p, side * p, channels)

"""Random patch masking with the official MAE semantics, as pure functions.

Per sample, `noise ~ U[0, 1)^L`; patches are ranked by ascending noise and the first
`int(L * (1 - mask_ratio))` are kept visible. Passing the same noise to this code and to
the PyTorch reference gives the same masks, patch for patch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Masking(NamedTuple):
  """Index bookkeeping for one batch of masks.

  Attributes:
    ids_keep: (B, K) indices of the visible patches, in ascending-noise order.
    ids_restore: (B, L) inverse permutation that puts shuffled tokens back in place.
    mask: (B, L) float, 1 for removed (masked) patches and 0 for visible ones.
  """

  ids_keep: jax.Array
  ids_restore: jax.Array
  mask: jax.Array


def num_visible(num_patches: int, mask_ratio: float) -> int:
  """Number of visible patches, `int(L * (1 - mask_ratio))` exactly as the official code."""
  if not 0.0 <= mask_ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
  return int(num_patches * (1 - mask_ratio))


def random_noise(key: jax.Array, batch_shape: tuple[int, ...], num_patches: int) -> jax.Array:
  """Draws the masking noise U[0, 1) of shape (*batch_shape, num_patches)."""
  return jax.random.uniform(key, (*batch_shape, num_patches), dtype=jnp.float32)


def from_noise(noise: jax.Array, mask_ratio: float) -> Masking:
  """Builds the masking of a (B, L) noise array (official `random_masking`)."""
  num_patches = noise.shape[-1]
  keep = num_visible(num_patches, mask_ratio)
  # A stable sort makes ties (possible with user-given noise) resolve by index.
  ids_shuffle = jnp.argsort(noise, axis=-1, stable=True)
  ids_restore = jnp.argsort(ids_shuffle, axis=-1, stable=True)
  ids_keep = ids_shuffle[..., :keep]
  shuffled_mask = jnp.concatenate(
    [
      jnp.zeros((*noise.shape[:-1], keep), jnp.float32),
      jnp.ones((*noise.shape[:-1], num_patches - keep), jnp.float32),
    ],
    axis=-1,
  )
  mask = jnp.take_along_axis(shuffled_mask, ids_restore, axis=-1)
  return Masking(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)

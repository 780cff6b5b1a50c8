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


def stratified_noise(
  key: jax.Array, num_masks: int, num_patches: int, mask_ratio: float
) -> jax.Array:
  """Masking noise (N, L) for masks whose visible patches partition the image in groups.

  Masks come in groups of `G = ceil(L / K)` (K = `num_visible(L, mask_ratio)`): each
  group draws one random permutation of the L patches and mask g of the group keeps
  patches `perm[(g K + j) mod L]`, j < K. At ratio 0.75 with 196 patches, four masks of
  49 visible patches show every patch exactly once; when K does not divide L, the
  group's first `G K - L` patches of `perm` are shown twice. Every single mask is still a
  uniformly random set of K patches (as with `random_noise`), so the expected map is
  the same; what changes is that no patch is hidden by chance far more often than
  others, which lowers the map's Monte-Carlo noise at a given number of masks.

  The result is noise in the `from_noise` convention (the K lowest values are the
  visible patches), a pure function of `key`; a partial last group uses its first masks.
  """
  keep = num_visible(num_patches, mask_ratio)
  if keep == 0:
    raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch of {num_patches}.")
  group = -(-num_patches // keep)
  groups = -(-num_masks // group)
  perm_key, order_key = jax.random.split(key)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_patches))(
    jax.random.split(perm_key, groups)
  )  # (groups, L)
  slots = (jnp.arange(group)[:, None] * keep + jnp.arange(keep)[None, :]) % num_patches
  visible = perms[:, slots].reshape(groups * group, keep)[:num_masks]  # (N, K)
  is_visible = jnp.zeros((num_masks, num_patches), bool)
  is_visible = is_visible.at[jnp.arange(num_masks)[:, None], visible].set(True)
  # Visible patches get noise in [0, 0.5), hidden ones [0.5, 1): ranking keeps exactly K.
  u = jax.random.uniform(order_key, (num_masks, num_patches), dtype=jnp.float32)
  return jnp.where(is_visible, 0.5 * u, 0.5 + 0.5 * u)


def schedule_noise(
  key: jax.Array, num_masks: int, num_patches: int, mask_ratio: float, schedule: str
) -> jax.Array:
  """(N, L) noise of one image's masks under `schedule` ('random' or 'stratified')."""
  if schedule == "random":
    return random_noise(key, (num_masks,), num_patches)
  if schedule == "stratified":
    return stratified_noise(key, num_masks, num_patches, mask_ratio)
  raise ValueError(f"masking={schedule!r} is not one of ('random', 'stratified').")

"""Zero-shot MAEDAY scoring: reconstruction error under many random masks.

For each image, N random masks (ratio 0.75) are drawn; the MAE reconstructs every
patch under each mask; the squared error to the input, summed over channels and
Gaussian-blurred (7 taps, sigma 1.4, reflect borders), averaged over masks, is the
pixel anomaly map; its maximum is the image score.

Masks are a `vmap` dimension and images a batch dimension. Because the blur is linear,
averaging the per-mask errors before blurring gives the same maps as blurring each one
(up to float rounding) at 1/N of the cost.

A dataset image's masks come from the run's key and the image itself (`image_ids` of its
pixels, `image_keys`), so its score never depends on what else is in the folder, on its
position or name, on the batch or on the number of devices and hosts.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax import parallel
from maeday_jax.blur import gaussian_blur
from maeday_jax.content_ids import image_ids  # noqa: F401  (re-exported)
from maeday_jax.models import MaskedAutoencoder
from maeday_jax.models import masking as patch_masking

DEFAULT_NUM_MASKS = 32
DEFAULT_MASK_RATIO = 0.75
BLUR_SIZE = 7
BLUR_SIGMA = 1.4


def squared_errors(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  mask_ratio: float = DEFAULT_MASK_RATIO,
  mask_batch_size: int | None = None,
) -> jax.Array:
  """Channel-summed squared reconstruction errors, one per mask: (B, N, H, W).

  Args:
    model, params: the MAE and its parameters.
    images: (B, H, W, 3) in the normalised pixel space.
    noise: (B, N, L) masking noise; mask n of image b follows `noise[b, n]`.
    mask_ratio: fraction of patches removed.
    mask_batch_size: reconstruct this many masks at a time (bounds memory for large
      models); None = all masks at once.
  """

  def one_mask(noise_b: jax.Array) -> jax.Array:  # (B, L) -> (B, H, W)
    pred = model.apply({"params": params}, images, noise=noise_b, mask_ratio=mask_ratio)
    recon = model.unpatchify(pred)
    return jnp.sum((images.astype(jnp.float32) - recon) ** 2, axis=-1)

  if mask_batch_size is None or mask_batch_size >= noise.shape[1]:
    # All masks in one vmapped pass: images x masks form one large batch.
    return jax.vmap(one_mask, in_axes=1, out_axes=1)(noise)
  # Chunks of `mask_batch_size` vmapped masks, looped over: bounded activation memory.
  per_mask = jax.lax.map(one_mask, jnp.swapaxes(noise, 0, 1), batch_size=mask_batch_size)
  return jnp.swapaxes(per_mask, 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "mask_ratio", "mask_batch_size"))
def anomaly_maps_from_noise(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  mask_ratio: float = DEFAULT_MASK_RATIO,
  mask_batch_size: int | None = None,
) -> jax.Array:
  """Pixel anomaly maps (B, H, W) for explicit masking noise (B, N, L)."""
  errors = squared_errors(model, params, images, noise, mask_ratio, mask_batch_size)
  return gaussian_blur(errors.mean(axis=1), BLUR_SIZE, BLUR_SIGMA)


def image_noise(
  keys: jax.Array,
  num_masks: int,
  num_patches: int,
  mask_ratio: float = DEFAULT_MASK_RATIO,
  schedule: str = "random",
) -> jax.Array:
  """Masking noise (B, N, L) from one PRNG key per image.

  Keying each image separately makes its masks independent of the batch it lands in,
  of the batch size and of the number of devices. `schedule` is 'random' (i.i.d.
  masks, the paper) or 'stratified' (`masking.stratified_noise`: groups of masks whose
  visible patches partition the image).
  """
  return jax.vmap(
    lambda k: patch_masking.schedule_noise(k, num_masks, num_patches, mask_ratio, schedule)
  )(keys)


def example_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """One key per example of a batch, derived from its position `indices` (B,)."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def image_keys(key: jax.Array, ids: jax.Array) -> jax.Array:
  """One key per image from the run's `key` and its `image_ids` row (B, 2)."""
  return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i[0]), i[1]))(ids)


@functools.partial(
  jax.jit, static_argnames=("model", "num_masks", "mask_ratio", "mask_batch_size", "masking")
)
def anomaly_maps(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  key: jax.Array,
  *,
  num_masks: int = DEFAULT_NUM_MASKS,
  mask_ratio: float = DEFAULT_MASK_RATIO,
  mask_batch_size: int | None = None,
  masking: str = "random",
) -> jax.Array:
  """Pixel anomaly maps (B, H, W) of `images` (B, H, W, 3) under `num_masks` masks.

  Image b uses the key `fold_in(key, b)`; see `image_noise` (and for `masking`,
  'random' or 'stratified'). Compiled once per model, shape and setting (the model is a
  static, hashable argument).
  """
  keys = example_keys(key, jnp.arange(images.shape[0]))
  noise = image_noise(keys, num_masks, model.num_patches, mask_ratio, masking)
  return anomaly_maps_from_noise(model, params, images, noise, mask_ratio, mask_batch_size)


def image_scores(maps: jax.Array) -> jax.Array:
  """Image anomaly score: the maximum of each map, (B, H, W) -> (B,) (NumPy in, NumPy
  out: maps of images of their own sizes, stitched on the host, compile nothing)."""
  if isinstance(maps, np.ndarray):
    return maps.max(axis=(-2, -1))
  return jnp.max(maps, axis=(-2, -1))


def score_function(
  model: MaskedAutoencoder,
  num_masks: int = DEFAULT_NUM_MASKS,
  mask_ratio: float = DEFAULT_MASK_RATIO,
  mask_batch_size: int | None = None,
  masking: str = "random",
):
  """The pure (not jitted) scoring function `score(params, images, ids, key) -> (maps,
  scores)`: image i's masks come from `image_keys(key, ids)[i]` (see `make_scorer`)."""

  def score(params, images, ids, key):
    noise = image_noise(image_keys(key, ids), num_masks, model.num_patches, mask_ratio, masking)
    maps = anomaly_maps_from_noise(model, params, images, noise, mask_ratio, mask_batch_size)
    return maps, image_scores(maps)

  return score


def make_scorer(
  model: MaskedAutoencoder,
  mesh,
  num_masks: int = DEFAULT_NUM_MASKS,
  mask_ratio: float = DEFAULT_MASK_RATIO,
  mask_batch_size: int | None = None,
  masking: str = "random",
):
  """One compiled, data-parallel scoring step over `mesh`.

  Returns `score(params, images, ids, key) -> (maps, scores)`: `images` (B, H, W, 3)
  and `ids` (B, 2) (`image_ids` of the images) are split over the mesh's data
  axis (B a multiple of its size), `params` (placed with `parallel.replicate`) and `key`
  are replicated. Image i's masks come from `image_keys(key, ids)[i]`, so results do not
  depend on batching, devices or the other images. `masking`: 'random' (the paper's
  i.i.d. masks) or 'stratified' (see `image_noise`).
  """

  score = score_function(model, num_masks, mask_ratio, mask_batch_size, masking)
  data, whole = parallel.batch_sharded(mesh), parallel.replicated(mesh)
  return jax.jit(score, in_shardings=(whole, data, data, whole), out_shardings=(data, data))


def reconstructions(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  mask_ratio: float = DEFAULT_MASK_RATIO,
) -> tuple[jax.Array, jax.Array]:
  """Reconstructed images (B, N, H, W, 3) and pixel masks (B, N, H, W) (1 = hidden).

  For pictures: what the MAE "thinks" the image looks like under each of N masks.
  """

  def one_mask(noise_b):
    pred = model.apply({"params": params}, images, noise=noise_b, mask_ratio=mask_ratio)
    patch_mask = patch_masking.from_noise(noise_b, mask_ratio).mask  # (B, L)
    hidden = jnp.repeat(patch_mask[..., None], model.patch_dim, axis=-1)
    return model.unpatchify(pred), model.unpatchify(hidden)[..., 0]

  recon, hidden = jax.vmap(one_mask, in_axes=1, out_axes=1)(noise)
  return recon, hidden

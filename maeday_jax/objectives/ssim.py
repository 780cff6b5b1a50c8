"""Structural similarity (SSIM) with a Gaussian window, as scikit-image computes it.

`ssim(x, y, data_range=R)` equals, image by image,
`skimage.metrics.structural_similarity(x, y, data_range=R, channel_axis=-1,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` (Wang et al. 2004):

- the window is scipy's Gaussian, truncated at 3.5 sigma (radius `int(3.5 * sigma + 0.5)`,
  11 taps for sigma 1.5), applied separably per channel;
- borders are padded by half-sample symmetric reflection (`scipy.ndimage`'s 'reflect',
  `numpy.pad`'s 'symmetric': the edge pixel is repeated);
- variances and the covariance are population (weighted) moments;
- the map is cropped by `(win_size - 1) // 2` pixels on every side, averaged per channel,
  and the channel means are averaged.

Everything is pure `jax.numpy`: jit-able and differentiable (an SSIM loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# scikit-image fixes the truncation when `gaussian_weights=True` so that sigma 1.5 gives
# the 11-tap window of Wang et al.
_TRUNCATE = 3.5


def gaussian_window(sigma: float = 1.5) -> np.ndarray:
  """The normalised 1-D Gaussian window `scipy.ndimage.gaussian_filter` uses (truncate 3.5)."""
  if sigma <= 0:
    raise ValueError(f"SSIM sigma must be positive, got {sigma}.")
  radius = int(_TRUNCATE * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  window = np.exp(-0.5 * (x / sigma) ** 2)
  return window / window.sum()


def default_win_size(sigma: float = 1.5) -> int:
  """scikit-image's window size for Gaussian weights: the filter's extent (11 at sigma 1.5)."""
  return 2 * int(_TRUNCATE * sigma + 0.5) + 1


def _float_inputs(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"SSIM needs images of one shape, got {x.shape} and {y.shape}.")
  if x.ndim != 4:
    raise ValueError(f"SSIM takes (B, H, W, C) images, got shape {x.shape}.")
  # At least float32 (bfloat16 moments would lose the variances to cancellation).
  dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  return x.astype(dtype), y.astype(dtype)


def _filter_matrix(size: int, window: np.ndarray) -> np.ndarray:
  """(size, size) matrix of the 1-D filter with symmetric (half-sample) borders."""
  radius = (len(window) - 1) // 2
  # Which source pixel each padded position reads (numpy's 'symmetric' = scipy 'reflect').
  source = np.pad(np.arange(size), radius, mode="symmetric")
  matrix = np.zeros((size, size), np.float64)
  for i in range(size):
    np.add.at(matrix[i], source[i : i + len(window)], window)
  return matrix


def _gaussian_filter(stack: jax.Array, window: np.ndarray) -> jax.Array:
  """Filters each channel of (B, H, W, K) with the separable window, same output size.

  Each 1-D pass is a product with a banded (H x H or W x W) matrix that includes the
  symmetric borders: plain matrix products, fast forward and backward on every backend
  (depthwise convolutions' gradients are slow on XLA:CPU). HIGHEST precision:
  accelerators would otherwise multiply float32 in TF32/bfloat16.
  """
  rows = jnp.asarray(_filter_matrix(stack.shape[1], window), stack.dtype)
  cols = jnp.asarray(_filter_matrix(stack.shape[2], window), stack.dtype)
  highest = jax.lax.Precision.HIGHEST
  stack = jnp.einsum("hi,biwk->bhwk", rows, stack, precision=highest)
  return jnp.einsum("wj,bhjk->bhwk", cols, stack, precision=highest)


def _constants(data_range, dtype, k1: float, k2: float) -> tuple[jax.Array, jax.Array]:
  if isinstance(data_range, (int, float)) and data_range <= 0:
    raise ValueError(f"SSIM data_range must be positive, got {data_range}.")
  r = jnp.asarray(data_range, dtype)
  if r.ndim == 1:  # One range per image.
    r = r[:, None, None, None]
  elif r.ndim != 0:
    raise ValueError(f"data_range must be a scalar or one value per image, got {r.shape}.")
  return (k1 * r) ** 2, (k2 * r) ** 2


def ssim_map(
  x: jax.Array,
  y: jax.Array,
  *,
  data_range,
  sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> jax.Array:
  """The local SSIM of two (B, H, W, C) image batches, (B, H, W, C), before any cropping.

  Equal, channel by channel, to the `S` map that `structural_similarity(...,
  gaussian_weights=True, use_sample_covariance=False, full=True)` returns.

  Args:
    x, y: images of one shape (B, H, W, C).
    data_range: the images' value range (max - min possible), a scalar or (B,).
    sigma: the Gaussian window's standard deviation (pixels).
    k1, k2: the stabilising constants, C1 = (k1 R)^2 and C2 = (k2 R)^2.
  """
  x, y = _float_inputs(x, y)
  window = gaussian_window(sigma)
  c1, c2 = _constants(data_range, x.dtype, k1, k2)
  # The moments are shift invariant: computing them on images centred per image and
  # channel avoids the float32 cancellation of E[x^2] - E[x]^2 when the values are large
  # against their spread (data_range 255); mathematically this is scikit-image's formula.
  mx = jax.lax.stop_gradient(x.mean(axis=(1, 2), keepdims=True))
  my = jax.lax.stop_gradient(y.mean(axis=(1, 2), keepdims=True))
  xc, yc = x - mx, y - my
  stats = _gaussian_filter(jnp.concatenate([xc, yc, xc * xc, yc * yc, xc * yc], axis=-1), window)
  uxc, uyc, uxx, uyy, uxy = jnp.split(stats, 5, axis=-1)
  vx = uxx - uxc * uxc
  vy = uyy - uyc * uyc
  vxy = uxy - uxc * uyc
  ux, uy = uxc + mx, uyc + my
  numerator = (2 * ux * uy + c1) * (2 * vxy + c2)
  denominator = (ux * ux + uy * uy + c1) * (vx + vy + c2)
  return numerator / denominator


def ssim(
  x: jax.Array,
  y: jax.Array,
  *,
  data_range,
  win_size: int | None = None,
  sigma: float = 1.5,
  k1: float = 0.01,
  k2: float = 0.03,
) -> jax.Array:
  """Mean SSIM per image (B,) of two (B, H, W, C) batches, as scikit-image computes it.

  Equal to `skimage.metrics.structural_similarity(x[b], y[b], data_range=data_range,
  channel_axis=-1, gaussian_weights=True, sigma=sigma, win_size=win_size, K1=k1, K2=k2,
  use_sample_covariance=False)` for each b.

  Args:
    x, y: images of one shape (B, H, W, C), H and W at least `win_size`.
    data_range: the images' value range (max - min possible), a scalar or (B,).
    win_size: odd; sets only the border crop `(win_size - 1) // 2`, as in scikit-image
      (the filter's extent follows sigma). None: the filter's extent, 11 for sigma 1.5.
    sigma: the Gaussian window's standard deviation (pixels).
    k1, k2: the stabilising constants.
  """
  x, y = _float_inputs(x, y)
  if win_size is None:
    win_size = default_win_size(sigma)
  if win_size % 2 != 1:
    raise ValueError(f"SSIM win_size must be odd, got {win_size}.")
  height, width = x.shape[1:3]
  if min(height, width) < win_size:
    raise ValueError(
      f"SSIM with win_size {win_size} needs images of at least that size, got {height}x{width}."
    )
  local = ssim_map(x, y, data_range=data_range, sigma=sigma, k1=k1, k2=k2)
  # Border pixels whose window leaves the image are left out (scikit-image's crop). Equal
  # pixel counts per channel: the mean over everything is the mean of channel means.
  crop = (win_size - 1) // 2
  return local[:, crop : height - crop, crop : width - crop, :].mean(axis=(1, 2, 3))

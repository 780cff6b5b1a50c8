"""Separable Gaussian blur with reflect padding, as used on reconstruction errors."""

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_kernel_1d(size: int = 7, sigma: float = 1.4) -> np.ndarray:
  """The normalised `size`-tap Gaussian kernel (torchvision's `_get_gaussian_kernel1d`)."""
  if size % 2 == 0 or size < 1:
    raise ValueError(f"Gaussian kernel size must be odd and positive, got {size}.")
  if sigma <= 0:
    raise ValueError(f"Gaussian sigma must be positive, got {sigma}.")
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  kernel = np.exp(-0.5 * (x / sigma) ** 2)
  return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(x: jax.Array, size: int = 7, sigma: float = 1.4) -> jax.Array:
  """Blurs the last two (H, W) axes of `x`; borders use reflect padding.

  Reflect padding is meant in the `numpy.pad(mode="reflect")` sense: the edge pixel is
  not repeated (PyTorch's blur does the same). The 2-D kernel is the outer product of two
  normalised 1-D kernels, applied as two 1-D passes of `size` shifted multiply-adds.
  """
  kernel = gaussian_kernel_1d(size, sigma)
  radius = size // 2
  height, width = x.shape[-2:]
  if min(height, width) <= radius:
    raise ValueError(f"Reflect padding of {radius} needs maps larger than {height}x{width}.")
  pad = [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad + [(radius, radius), (0, 0)], mode="reflect")
  x = sum(float(w) * x[..., i : i + height, :] for i, w in enumerate(kernel))
  x = jnp.pad(x, pad + [(0, 0), (radius, radius)], mode="reflect")
  return sum(float(w) * x[..., :, i : i + width] for i, w in enumerate(kernel))

"""Perlin noise and DRAEM's Perlin anomaly masks, in JAX (see `mala.synthetic`).

Perlin noise is evaluated at continuous lattice coordinates `pixel * scale / size`, so
the per-axis scale 2**randint(0, 7) is a traced number, not a shape (DRAEM needs the size
divisible by the scale; here any size works). The gradient of lattice point (i, j) is a
hash of (i, j) and the key instead of an entry of a drawn table: the same uniform random
angles, on an unbounded lattice, with no table to gather from. The rotation of a mask by
U[-90, 90) degrees samples the noise at rotated coordinates instead of rotating a noise
image, so the rotated corners hold noise too (imgaug fills them with 0, i.e. never
anomalous there).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.mala import counter_rng as rng


def _fade(t: jax.Array) -> jax.Array:
  """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0, 1)."""
  return t * t * t * (t * (t * 6 - 15) + 10)


def noise_at(seed: jax.Array, u: jax.Array, v: jax.Array, stream: int = 0) -> jax.Array:
  """Gradient noise at lattice coordinates (u, v) (any real values, broadcast together).

  Same formula as DRAEM's `rand_perlin_2d`, including its sqrt(2) factor that brings
  the values to [-1, 1]; the unit gradient of lattice point (i, j) has the angle
  2 pi * U[0, 1) hashed from (stream, i, j) under `seed` (2,) uint32.
  """
  u, v = jnp.broadcast_arrays(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32))
  u0, v0 = jnp.floor(u), jnp.floor(v)
  fu, fv = u - u0, v - v0
  i0, j0 = u0.astype(jnp.int32), v0.astype(jnp.int32)

  def corner(di: int, dj: int) -> jax.Array:
    angle = 2 * math.pi * rng.uniform(seed, rng.STREAM_GRADIENT + stream, i0 + di, j0 + dj)
    return jnp.cos(angle) * (fu - di) + jnp.sin(angle) * (fv - dj)

  n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
  tu, tv = _fade(fu), _fade(fv)
  top = n00 + tu * (n10 - n00)
  bottom = n01 + tu * (n11 - n01)
  return math.sqrt(2) * (top + tv * (bottom - top))


@functools.partial(jax.jit, static_argnames=("size",))
def _perlin_noise(key, size, scale):
  height, width = size
  s = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (2,))
  rows = jnp.arange(height, dtype=jnp.float32)[:, None] * (s[0] / height)
  cols = jnp.arange(width, dtype=jnp.float32)[None, :] * (s[1] / width)
  return noise_at(rng.seed(key), rows, cols)


def perlin_noise(
  key: jax.Array, size: tuple[int, int], scale: int | tuple[int, int] | jax.Array
) -> jax.Array:
  """2-D Perlin (gradient) noise (H, W) float32 with `scale` lattice cells per axis.

  DRAEM's `rand_perlin_2d`: random unit gradients at the lattice points, the quintic
  fade, values in [-1, 1] (0 on the lattice points). Pixel (i, j) sits at lattice
  coordinate (i * scale[0] / H, j * scale[1] / W), so `scale` may be a traced value (one
  compiled program for every scale) and need not divide the size. Jitted (static
  `size`); works inside an outer jit and vmap.

  Args:
    key: PRNG key of the gradients.
    size: (H, W).
    scale: lattice cells along (rows, columns): a pair or one number for both, ints or
      floats >= 0, concrete (checked) or traced.
  """
  try:
    concrete = np.asarray(scale, np.float64)
  except (TypeError, jax.errors.ConcretizationTypeError):
    concrete = None  # traced: the caller vouches for it
  if concrete is not None and (concrete.size not in (1, 2) or concrete.min() < 0):
    raise ValueError(f"scale must be one or two numbers >= 0, got {scale!r}.")
  return _perlin_noise(key, rng.as_hw(size), scale)


def mask_from_seed(seed, size, threshold, min_exp, max_exp):
  """`perlin_mask` from a seed (2,) uint32 (for callers that derive one seed per image)."""
  height, width = size
  u = rng.uniform(seed, rng.STREAM_PARAMS, jnp.arange(3))
  exps = min_exp + rng.pick(u[:2], max_exp - min_exp + 1)
  scale = jnp.exp2(exps.astype(jnp.float32))
  angle = (u[2] - 0.5) * math.pi  # [-90, 90) degrees
  dy = jnp.arange(height, dtype=jnp.float32)[:, None] - (height - 1) / 2
  dx = jnp.arange(width, dtype=jnp.float32)[None, :] - (width - 1) / 2
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_rows = (height - 1) / 2 + cos * dy + sin * dx
  src_cols = (width - 1) / 2 - sin * dy + cos * dx
  noise = noise_at(seed, src_rows * (scale[0] / height), src_cols * (scale[1] / width))
  return (noise > threshold).astype(jnp.float32)


def check_exps(min_exp: int, max_exp: int) -> None:
  """Raises ValueError unless 0 <= min_exp <= max_exp (the Perlin scale exponents)."""
  if not 0 <= min_exp <= max_exp:
    raise ValueError(f"need 0 <= min_exp <= max_exp, got min_exp={min_exp}, max_exp={max_exp}.")


@functools.partial(jax.jit, static_argnames=("size", "min_exp", "max_exp"))
def perlin_mask(
  key: jax.Array,
  size: tuple[int, int],
  *,
  threshold: float | jax.Array = 0.5,
  min_exp: int = 0,
  max_exp: int = 6,
) -> jax.Array:
  """DRAEM's anomaly shape: thresholded, rotated Perlin noise, (H, W) float32 in {0, 1}.

  The scale of each axis is drawn independently as 2**randint(min_exp, max_exp + 1),
  i.e. 1 to 64 lattice cells per side by default (DRAEM's `torch.randint(0, 6)` excludes
  its upper bound, so exactly DRAEM's range, 1 to 32 cells, is max_exp=5). The noise is
  turned by a uniform angle in [-90, 90) degrees about the image centre by sampling it at
  rotated coordinates, then `noise > threshold` is the mask.

  Args:
    key: PRNG key.
    size: (H, W), static.
    threshold: the noise level above which a pixel is anomalous (noise is in [-1, 1]);
      may be traced.
    min_exp, max_exp: the range of the scale exponents, static, 0 <= min_exp <= max_exp.
  """
  check_exps(min_exp, max_exp)
  return mask_from_seed(rng.seed(key), rng.as_hw(size), threshold, min_exp, max_exp)

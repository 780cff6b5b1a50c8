"""Synthetic anomalies for MALA's second stage: DRAEM's Perlin-mask generator, in JAX.

DRAEM (Zavrtanik et al., ICCV 2021) makes a training defect out of a normal image by
pasting a foreign texture through a random Perlin-noise blob:

  out = image * (1 - m) + (1 - beta) * texture * m + beta * image * m

with m the thresholded (rotated) Perlin noise and beta ~ U(0, 0.8). A segmenter trained
on (out, m) learns "what does not belong here" without ever seeing a real defect.

Everything works on float32 RGB images (B, H, W, 3) in [0, 1] (the caller converts to and
from the model's normalisation) and is a pure function of a PRNG key, jitted, so the
whole generator runs on device inside the training step. The parts, each in its module:

- `mala.counter_rng`: counter-based random numbers (one small `jax.random.bits` call
  per function, every other number a hash of counters), fast to compile;
- `mala.perlin`: Perlin noise and masks (`perlin_noise`, `perlin_mask`), at continuous
  lattice coordinates so the scale is traced, not a shape;
- `mala.textures`: the foreign textures (`textures_from_images`, `procedural_textures`,
  `textures_from_bank`), with random flips, rotations and colour jitter on device;
- `mala.texture_folder`: a texture bank such as DTD read once (`load_texture_folder`);
- here: the foreground estimate, DRAEM's blend, and `synthesize(key, images, textures)`,
  which gives the anomalous images and their masks.

Every public name of those modules is importable from here too (`synthetic.perlin_mask`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from maeday_jax.mala import counter_rng as rng
from maeday_jax.mala import perlin
from maeday_jax.mala.perlin import perlin_mask, perlin_noise
from maeday_jax.mala.texture_folder import TEXTURE_EXTENSIONS, load_texture_folder
from maeday_jax.mala.textures import (
  color_jitter,
  grey,
  other_image_indices,
  procedural_textures,
  texture_views,
  textures_from_bank,
  textures_from_images,
)

__all__ = [
  "TEXTURE_EXTENSIONS",
  "blend",
  "color_jitter",
  "foreground_mask",
  "load_texture_folder",
  "other_image_indices",
  "perlin_mask",
  "perlin_noise",
  "procedural_textures",
  "synthesize",
  "texture_views",
  "textures_from_bank",
  "textures_from_images",
]


@functools.partial(jax.jit, static_argnames=("border", "dilation"))
def foreground_mask(
  images: jax.Array,
  threshold: float | jax.Array = 0.1,
  *,
  border: int = 2,
  dilation: int = 2,
) -> jax.Array:
  """A heuristic foreground (B, H, W) float32 in {0, 1} of object images (B, H, W, 3).

  A pixel is foreground when its grey value (3x3 mean) differs from the median grey of
  the image's outer `border` pixels by more than `threshold` (grey in [0, 1]); the
  result is dilated by `dilation` pixels so the object's edge is included. This is a
  heuristic for centred objects on a plain background (MVTec AD's bottle, screw, ...);
  it fails on textured backgrounds, objects touching the border, or objects the colour
  of the background. Callers that know better (a dataset's own masks, a saliency model)
  pass their own foreground to `synthesize`.
  """
  if border < 1 or dilation < 0:
    raise ValueError(f"need border >= 1 and dilation >= 0, got {border} and {dilation}.")
  luma = grey(images.astype(jnp.float32))
  # 3x3 mean (edge-padded) so single noisy pixels do not count as foreground.
  padded = jnp.pad(luma, ((0, 0), (1, 1), (1, 1)), mode="edge")
  smooth = jax.lax.reduce_window(padded, 0.0, jax.lax.add, (1, 3, 3), (1, 1, 1), "VALID") / 9
  batch = smooth.shape[0]
  ring = jnp.concatenate(
    [
      smooth[:, :border].reshape(batch, -1),
      smooth[:, -border:].reshape(batch, -1),
      smooth[:, :, :border].reshape(batch, -1),
      smooth[:, :, -border:].reshape(batch, -1),
    ],
    axis=1,
  )
  background = jnp.median(ring, axis=1)[:, None, None]
  fg = (jnp.abs(smooth - background) > threshold).astype(jnp.float32)
  if dilation > 0:
    window = (1, 2 * dilation + 1, 2 * dilation + 1)
    fg = jax.lax.reduce_window(fg, 0.0, jax.lax.max, window, (1, 1, 1), "SAME")
  return fg


@jax.jit
def blend(images: jax.Array, textures: jax.Array, masks: jax.Array, beta: jax.Array) -> jax.Array:
  """DRAEM's blend: image * (1 - m) + (1 - beta) * texture * m + beta * image * m.

  images, textures (B, H, W, C); masks (B, H, W) in [0, 1]; beta (B,). Where m == 0 the
  output is the input image exactly (not merely to rounding), whatever the texture.
  """
  images = images.astype(jnp.float32)
  m = masks.astype(jnp.float32)[..., None]
  b = jnp.asarray(beta, jnp.float32).reshape(-1, 1, 1, 1)
  mixed = images * (1 - m) + (1 - b) * textures.astype(jnp.float32) * m + b * images * m
  return jnp.where(m > 0, mixed, images)


@functools.partial(
  jax.jit,
  static_argnames=("anomaly_prob", "beta_range", "threshold", "min_exp", "max_exp", "return_beta"),
)
def synthesize(
  key: jax.Array,
  images: jax.Array,
  textures: jax.Array,
  *,
  foreground: jax.Array | None = None,
  anomaly_prob: float = 0.5,
  beta_range: tuple[float, float] = (0.0, 0.8),
  threshold: float = 0.5,
  min_exp: int = 0,
  max_exp: int = 6,
  return_beta: bool = False,
):
  """DRAEM's synthetic anomalies of a batch: (anomalous_images, masks).

  Per image, with probability `anomaly_prob`: a `perlin_mask` (multiplied by
  `foreground` when given), beta ~ U(beta_range), and `blend(image, texture, mask,
  beta)`; otherwise the image unchanged and an all-zero mask. An image whose mask is
  empty (the noise never passed the threshold, or the foreground removed all of it) is
  also unchanged, with its all-zero mask: the masks are the exact truth.

  Jitted; the settings are static (a change recompiles), `foreground` is an array or
  None. Deterministic given the key.

  Args:
    key: PRNG key.
    images: normal images (B, H, W, 3) float in [0, 1].
    textures: foreign textures (B, H, W, 3) in [0, 1], e.g. from `textures_from_images`,
      `procedural_textures` or `textures_from_bank`.
    foreground: optional (B, H, W) in [0, 1] where anomalies may appear (object pixels;
      see `foreground_mask`); a soft foreground gives soft masks.
    anomaly_prob: the probability that an image gets an anomaly, in [0, 1].
    beta_range: (low, high) of the uniform opacity of the image inside the anomaly
      (0: pure texture), a tuple (static arguments must be hashable), 0 <= low <= high <= 1.
    threshold: Perlin noise threshold of the mask (higher: smaller anomalies).
    min_exp, max_exp: the Perlin scale exponents (`perlin_mask`).
    return_beta: also return the drawn beta (B,) (drawn for every image, used only where
      the mask is non-zero), for checks and logging.

  Returns:
    anomalous images (B, H, W, 3) float32, masks (B, H, W) float32 in [0, 1] (binary
    without a soft foreground), and beta (B,) when `return_beta`.
  """
  perlin.check_exps(min_exp, max_exp)
  if not 0.0 <= anomaly_prob <= 1.0:
    raise ValueError(f"anomaly_prob must be in [0, 1], got {anomaly_prob}.")
  low, high = beta_range
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"beta_range must satisfy 0 <= low <= high <= 1, got {beta_range}.")
  batch, height, width, _ = images.shape
  if textures.shape != images.shape:
    raise ValueError(f"textures {textures.shape} must have the shape of images {images.shape}.")
  seed = rng.seed(key)
  masks = jax.vmap(
    lambda s: perlin.mask_from_seed(s, (height, width), threshold, min_exp, max_exp)
  )(rng.child_seeds(seed, rng.STREAM_IMAGE, batch))
  u = rng.uniform(seed, rng.STREAM_PARAMS, jnp.arange(batch)[:, None], jnp.arange(2)[None, :])
  apply = u[:, 0] < anomaly_prob
  masks = masks * apply[:, None, None].astype(jnp.float32)
  if foreground is not None:
    if foreground.shape != (batch, height, width):
      raise ValueError(
        f"foreground {foreground.shape} must be (B, H, W) = {(batch, height, width)}."
      )
    masks = masks * jnp.clip(foreground.astype(jnp.float32), 0.0, 1.0)
  beta = low + (high - low) * u[:, 1]
  out = blend(images, textures, masks, beta)
  return (out, masks, beta) if return_beta else (out, masks)

"""On-device augmentation of the few-shot images: random crop and random rotation.

Spec section 1 says only "random crop and random rotation". Industrial images are mostly
centred objects or stationary textures, and a large rotation or a tight crop can turn a
normal image into what the test set calls an anomaly (a misplaced or missing part), so
the defaults are mild:

- crop: a square-aspect window of a uniform random area fraction in [0.8, 1] of the image
  (side in [0.89, 1]) at a uniform random position, resized back to the full size;
- rotation: a uniform random angle in [-15, 15] degrees about the crop's centre;
- one bilinear resampling for both (no double blur); pixels that fall outside the image
  after the rotation are filled by reflecting the image at its border (half-sample
  symmetric, scipy's mode 'reflect'), so no black corners teach the model a fake pattern.

Everything is a pure function of a key (or of `NUM_UNIFORMS` uniform numbers drawn from
one), written for one image and `vmap`ped over the batch, so it runs on device inside the
training step, and each copy of a shot gets its own crop and angle. It works on
normalised images (B, H, W, C) of any channel count.
"""

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.settings import few_shot as few_shot_settings

DEFAULT_MAX_ROTATION_DEG = few_shot_settings.MAX_ROTATION_DEG
DEFAULT_CROP_SCALE = few_shot_settings.CROP_SCALE
DEFAULT_FILL_MODE = few_shot_settings.FILL_MODE
FILL_MODES = ("reflect", "mirror", "nearest", "wrap")
# Random numbers per image: rotation angle, crop area, crop centre row and column.
NUM_UNIFORMS = 4


def _fix_index(index: jax.Array, size: int, fill_mode: str) -> jax.Array:
  """Maps integer pixel indices outside [0, size) back inside, as `fill_mode` says."""
  if fill_mode == "reflect":  # d c b a | a b c d | d c b a (edge pixel repeated)
    index = jnp.mod(index, 2 * size)
    return jnp.where(index >= size, 2 * size - 1 - index, index)
  if fill_mode == "mirror":  # d c b | a b c d | c b a (edge pixel not repeated)
    period = max(2 * size - 2, 1)
    index = jnp.mod(index, period)
    return jnp.where(index >= size, period - index, index)
  if fill_mode == "nearest":
    return jnp.clip(index, 0, size - 1)
  if fill_mode == "wrap":
    return jnp.mod(index, size)
  raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}.")


def bilinear_sample(
  image: jax.Array, rows: jax.Array, cols: jax.Array, fill_mode: str = DEFAULT_FILL_MODE
) -> jax.Array:
  """Samples a (H, W, C) image at real-valued pixel coordinates (rows, cols), bilinearly.

  Pixel (i, j) sits at coordinate (i, j). Same values as
  `scipy.ndimage.map_coordinates(order=1)` per channel, but the four neighbours are
  gathered for all channels at once, which compiles and runs faster on every backend.
  """
  height, width, _ = image.shape
  r0, c0 = jnp.floor(rows), jnp.floor(cols)
  wr, wc = (rows - r0)[..., None], (cols - c0)[..., None]
  r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
  r = [_fix_index(r0 + d, height, fill_mode) for d in (0, 1)]
  c = [_fix_index(c0 + d, width, fill_mode) for d in (0, 1)]
  image = image.astype(jnp.float32)
  top = (1 - wc) * image[r[0], c[0]] + wc * image[r[0], c[1]]
  bottom = (1 - wc) * image[r[1], c[0]] + wc * image[r[1], c[1]]
  return (1 - wr) * top + wr * bottom


def warp(
  image: jax.Array,
  angle: jax.Array,
  side: jax.Array,
  center: jax.Array,
  fill_mode: str = DEFAULT_FILL_MODE,
) -> jax.Array:
  """Resamples a (H, W, C) image from a rotated square-aspect window, bilinearly.

  Output pixel (i, j) at offset d = (i, j) - c_out from the output centre reads the input
  at `center + side * R(angle) d`, where `R` turns the content counter-clockwise by `angle`
  (radians) as displayed (rows down), like `np.rot90`. `side` is the window's size as a
  fraction of the image (1 = whole image); `center` is (row, column) in input pixels.
  With angle 0, side 1 and the centre of the image this is the identity.
  """
  height, width, _ = image.shape
  rows = jnp.arange(height, dtype=jnp.float32) - (height - 1) / 2
  cols = jnp.arange(width, dtype=jnp.float32) - (width - 1) / 2
  dy, dx = jnp.meshgrid(rows * side, cols * side, indexing="ij")
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_rows = center[0] + cos * dy + sin * dx
  src_cols = center[1] - sin * dy + cos * dx
  return bilinear_sample(image, src_rows, src_cols, fill_mode).astype(image.dtype)


def warp_params(
  uniforms: jax.Array,
  image_shape: tuple[int, ...],
  max_rotation_deg: float = DEFAULT_MAX_ROTATION_DEG,
  crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Maps `NUM_UNIFORMS` U[0, 1) numbers to (angle in radians, side fraction, centre).

  Taking uniforms rather than a key lets a caller draw the randomness of a whole batch
  (augmentation and masks) in one call, which compiles much faster than one per copy.
  """
  lo, hi = crop_scale
  if not 0.0 < lo <= hi <= 1.0:
    raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}.")
  if max_rotation_deg < 0:
    raise ValueError(f"max_rotation_deg must be >= 0, got {max_rotation_deg}.")
  u = jnp.asarray(uniforms, jnp.float32)
  max_angle = np.deg2rad(max_rotation_deg)
  angle = (2 * u[0] - 1) * max_angle
  # Area fraction uniform in [lo, hi] (as torchvision's RandomResizedCrop), aspect kept.
  side = jnp.sqrt(lo + (hi - lo) * u[1])
  # The window's sample points stay inside the image (first and last at most on the edge
  # pixels): its centre moves within the slack that `side` leaves.
  extent = jnp.asarray(image_shape[:2], jnp.float32) - 1
  slack = (1.0 - side) * extent
  center = extent / 2 + slack * (u[2:4] - 0.5)
  return angle, side, center


def augment(
  image: jax.Array,
  uniforms: jax.Array,
  max_rotation_deg: float = DEFAULT_MAX_ROTATION_DEG,
  crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
  fill_mode: str = DEFAULT_FILL_MODE,
) -> jax.Array:
  """Crop + rotation of one (H, W, C) image, set by `NUM_UNIFORMS` U[0, 1) numbers."""
  if fill_mode not in FILL_MODES:
    raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {fill_mode!r}.")
  angle, side, center = warp_params(uniforms, image.shape, max_rotation_deg, tuple(crop_scale))
  return warp(image, angle, side, center, fill_mode)


def augment_batch(
  images: jax.Array,
  uniforms: jax.Array,
  max_rotation_deg: float = DEFAULT_MAX_ROTATION_DEG,
  crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
  fill_mode: str = DEFAULT_FILL_MODE,
) -> jax.Array:
  """`augment` of each image (B, H, W, C) with its own row of `uniforms` (B, 4)."""
  return jax.vmap(lambda x, u: augment(x, u, max_rotation_deg, crop_scale, fill_mode))(
    images, uniforms
  )

"""Foreign textures for DRAEM-style synthetic anomalies (`mala.synthetic`), on device.

Sources: the other images of the batch (`textures_from_images`, `texture_views` for a
batch of one), procedural patterns (`procedural_textures`), or a texture bank such as DTD
put on device once (`textures_from_bank`; `mala.texture_folder.load_texture_folder`
reads one). Each texture is shown through random flips, rotations and zooms and a random
colour jitter, all on device; DRAEM uses DTD and imgaug. Random numbers come from
`mala.counter_rng`, so every function is a pure, jitted function of its PRNG key.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp

from maeday_jax import augment
from maeday_jax.mala import counter_rng as rng
from maeday_jax.mala import perlin

# ITU-R 601 luma weights: the grey value of colour jitter and of the foreground estimate.
_GREY = (0.299, 0.587, 0.114)
_FBM_OCTAVES = 4
_NUM_PATTERNS = 5  # fractal noise, blobs, stripes, checkerboard, dots
_CHANNEL_ORDERS = tuple(itertools.permutations(range(3)))
# Random numbers per image of the texture views: 3 flips, the warp, 7 for colour jitter.
_VIEW_UNIFORMS = 3 + augment.NUM_UNIFORMS
_JITTER_UNIFORMS = 7


def grey(images: jax.Array) -> jax.Array:
  """Grey value (..., H, W) of RGB images (..., H, W, 3)."""
  return images @ jnp.asarray(_GREY, images.dtype)


def _color_jitter(u: jax.Array, image: jax.Array) -> jax.Array:
  """`color_jitter` set by `_JITTER_UNIFORMS` U[0, 1) numbers."""
  span = lambda i, lo, hi: lo + (hi - lo) * u[i]
  x = image.astype(jnp.float32) * span(0, 0.7, 1.3)
  mean = jnp.mean(grey(x))
  x = mean + (x - mean) * span(1, 0.6, 1.4)
  luma = grey(x)[..., None]
  x = jnp.clip(luma + (x - luma) * span(2, 0.4, 1.6), 0.0, 1.0)
  x = x ** jnp.exp(span(3, math.log(0.6), math.log(1.6)))
  # A random one of the 6 channel orders (the identity among them) half of the time.
  x = jnp.where(u[5] < 0.5, x[..., jnp.asarray(_CHANNEL_ORDERS)[rng.pick(u[4], 6)]], x)
  return jnp.where(u[6] < 0.15, 1.0 - x, x)


@jax.jit
def color_jitter(key: jax.Array, image: jax.Array) -> jax.Array:
  """Random colour change of one (H, W, 3) image in [0, 1], clipped to [0, 1].

  Brightness x U(0.7, 1.3), contrast about the mean grey x U(0.6, 1.4), saturation
  x U(0.4, 1.6), gamma log-uniform in [0.6, 1.6], a random channel order (a coarse hue
  change) half of the time and an inversion 15 % of the time: strong enough that a
  texture cut from a normal image does not look like a normal image any more, as
  DRAEM's imgaug augmenters intend.
  """
  u = rng.uniform(rng.seed(key), rng.STREAM_PARAMS, jnp.arange(_JITTER_UNIFORMS))
  return _color_jitter(u, image)


def _random_view(u: jax.Array, image: jax.Array) -> jax.Array:
  """A random flip / 90-degree turn, then a random zoom (area 1/4..1) and turn of +-45 deg.

  Set by `_VIEW_UNIFORMS` U[0, 1) numbers. The dihedral part is exact; the zoom and turn
  are one bilinear resampling with the image reflected at its border (`augment.warp`),
  so no black corners appear. Non-square images are not transposed (that would change
  their shape).
  """
  height, width, _ = image.shape
  if height == width:
    image = jnp.where(u[0] < 0.5, image.swapaxes(0, 1), image)
  image = jnp.where(u[1] < 0.5, image[:, ::-1], image)
  image = jnp.where(u[2] < 0.5, image[::-1], image)
  angle, side, center = augment.warp_params(
    u[3:], image.shape, max_rotation_deg=45.0, crop_scale=(0.25, 1.0)
  )
  return augment.warp(image, angle, side, center, "reflect")


def _views(seed: jax.Array, images: jax.Array, jitter: bool) -> jax.Array:
  """`_random_view` (and `_color_jitter`) of each image, clipped to [0, 1]."""
  batch = images.shape[0]
  count = _VIEW_UNIFORMS + _JITTER_UNIFORMS
  u = rng.uniform(seed, rng.STREAM_IMAGE, jnp.arange(batch)[:, None], jnp.arange(count)[None, :])
  out = jax.vmap(_random_view)(u[:, :_VIEW_UNIFORMS], images.astype(jnp.float32))
  if jitter:
    out = jax.vmap(_color_jitter)(u[:, _VIEW_UNIFORMS:], out)
  return jnp.clip(out, 0.0, 1.0)


def _other_indices(seed: jax.Array, batch: int) -> jax.Array:
  if batch < 2:
    raise ValueError(f"textures from other images need a batch of at least 2, got {batch}.")
  shift = 1 + rng.pick(rng.uniform(seed, rng.STREAM_PARAMS, 0), batch - 1)
  return jnp.mod(jnp.arange(batch) + shift, batch)


@functools.partial(jax.jit, static_argnames=("batch",))
def other_image_indices(key: jax.Array, batch: int) -> jax.Array:
  """A random permutation (batch,) of the batch that maps no index to itself.

  Index b goes to (b + shift) % batch with shift ~ U{1, ..., batch - 1}: every image
  lends its content to exactly one other image. Needs batch >= 2. The permutation
  `textures_from_images(key, ...)` uses.
  """
  return _other_indices(rng.seed(key), batch)


@functools.partial(jax.jit, static_argnames=("jitter",))
def textures_from_images(key: jax.Array, images: jax.Array, *, jitter: bool = True) -> jax.Array:
  """Foreign textures (B, H, W, 3) in [0, 1] cut from the other normal images of the batch.

  Image b gets the content of image `other_image_indices(key, B)[b]` (never itself),
  seen through a random flip / rotation / zoom and, with `jitter`, a random colour change
  (`color_jitter`). Needs B >= 2. No dataset needed, but on texture categories the
  "foreign" texture is the same material, which makes subtle anomalies; mix with
  `procedural_textures` or a texture bank for variety.
  """
  seed = rng.seed(key)
  source = _other_indices(seed, images.shape[0])
  return _views(seed, images[source], jitter)


def texture_views(key: jax.Array, images: jax.Array, *, jitter: bool = True) -> jax.Array:
  """Each image (B, H, W, 3) in [0, 1] seen through a random flip / rotation / zoom and,
  with `jitter`, a random colour change: the textures of `textures_from_images` without
  the exchange between images (for a batch of one)."""
  return _views(rng.seed(key), images, jitter)


def _fractal(seed: jax.Array, rows: jax.Array, cols: jax.Array, base: jax.Array) -> jax.Array:
  """Multi-octave Perlin noise (fBm), standardised per image to mean 0, std 1."""
  total = 0.0
  for octave in range(_FBM_OCTAVES):
    s = base * 2.0**octave
    total = total + 0.5**octave * perlin.noise_at(seed, rows * s[0], cols * s[1], stream=octave)
  return (total - jnp.mean(total)) / (jnp.std(total) + 1e-6)


# The random numbers of one procedural texture, by name (indices into one draw).
_PARAMS = (
  ("base_row", "base_col", "hard", "theta", "freq", "warp", "warp_on", "phase", "aspect")
  + ("radius", "cloud_gain", "blob_level", "kind_a", "kind_b", "mix", "mix_on", "tint")
  + ("grain",)
  + tuple(f"colour{k}" for k in range(9))
)
_P = {name: i for i, name in enumerate(_PARAMS)}


def _procedural_texture(seed: jax.Array, size: tuple[int, int]) -> jax.Array:
  """One procedural texture (H, W, 3) in [0, 1]; see `procedural_textures`."""
  height, width = size
  r = rng.uniform(seed, rng.STREAM_PARAMS, jnp.arange(len(_P)))
  span = lambda name, lo, hi: lo + (hi - lo) * r[_P[name]]
  log_span = lambda name, lo, hi: jnp.exp(span(name, math.log(lo), math.log(hi)))

  rows = jnp.arange(height, dtype=jnp.float32)[:, None] / height  # in [0, 1)
  cols = jnp.arange(width, dtype=jnp.float32)[None, :] / width
  # Base scale 1..8 cells per side and axis; 4 octaves reach 64.
  base = jnp.exp2(rng.pick(r[jnp.asarray([_P["base_row"], _P["base_col"]])], 4).astype(jnp.float32))
  z = _fractal(seed, rows, cols, base)

  # Hardness of the edges: from soft gradients to sharp binary patterns.
  hard = log_span("hard", 2.0, 30.0)
  # Periodic patterns on a rotated grid of `freq` cycles per image side, half of the
  # time wobbling with the fractal noise (domain warp) so they are not perfectly regular.
  theta = span("theta", 0.0, math.pi)
  freq = log_span("freq", 2.0, 24.0)
  warp_amount = span("warp", 0.0, 0.5) * (r[_P["warp_on"]] < 0.5)
  y, x = rows - 0.5, cols - 0.5
  u = (y * jnp.cos(theta) + x * jnp.sin(theta)) * freq + span("phase", 0.0, 1.0)
  u = u + warp_amount * z
  v = (-y * jnp.sin(theta) + x * jnp.cos(theta)) * freq * log_span("aspect", 0.5, 2.0)
  su, sv = jnp.sin(2 * math.pi * u), jnp.sin(2 * math.pi * v)
  dist = jnp.hypot(u - jnp.round(u), v - jnp.round(v))
  fields = jnp.stack(
    [
      jax.nn.sigmoid(span("cloud_gain", 1.0, 3.0) * z),  # fractal clouds
      jax.nn.sigmoid(hard * (z - span("blob_level", -1.0, 1.0))),  # blobs / camouflage
      jax.nn.sigmoid(hard * su),  # stripes
      jax.nn.sigmoid(hard * su * sv),  # checkerboard
      jax.nn.sigmoid(hard * 5 * (span("radius", 0.15, 0.45) - dist)),  # dots
    ]
  )
  # Two patterns mixed 40 % of the time (stripes over clouds, dots on blobs...).
  mix = r[_P["mix"]] * (r[_P["mix_on"]] < 0.4)
  first = fields[rng.pick(r[_P["kind_a"]], _NUM_PATTERNS)]
  second = fields[rng.pick(r[_P["kind_b"]], _NUM_PATTERNS)]
  field = (1 - mix) * first + mix * second
  colours = r[_P["colour0"] : _P["colour0"] + 9].reshape(3, 3)
  rgb = colours[0] + (colours[1] - colours[0]) * field[..., None]
  # A slow tint towards a third colour, and a little grain, so flat areas are not flat.
  slow = perlin.noise_at(seed, rows * 3.0, cols * 3.0, stream=_FBM_OCTAVES)
  tint = jax.nn.sigmoid(6.0 * slow) * span("tint", 0.0, 0.5)
  rgb = rgb + (colours[2] - rgb) * tint[..., None]
  pixel = jnp.arange(height)[:, None] * width + jnp.arange(width)[None, :]
  grain = (rng.uniform(seed, rng.STREAM_PIXEL, pixel) - 0.5) * span("grain", 0.0, 0.12)
  return jnp.clip(rgb + grain[..., None], 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("batch", "size"))
def procedural_textures(key: jax.Array, batch: int, size: int | tuple[int, int]) -> jax.Array:
  """`batch` procedural textures (batch, H, W, 3) in [0, 1], no dataset needed.

  Each texture is one of five patterns, or a mix of two: standardised multi-octave
  Perlin clouds, thresholded blobs, stripes, checkerboards or dots, the periodic ones at
  a random frequency (2 to 24 cycles per side), angle, aspect and phase, optionally
  wobbling with the fractal noise; random edge hardness from soft to binary; mapped
  between two random colours, tinted towards a third by slow noise, plus grain. The
  point is variety: a segmenter must not be able to learn one pattern as "the defect".
  `size` is an int (square) or (H, W); `batch` and `size` are static.
  """
  hw = rng.as_hw(size)
  seeds = rng.child_seeds(rng.seed(key), rng.STREAM_IMAGE, batch)
  return jax.vmap(lambda s: _procedural_texture(s, hw))(seeds)


@functools.partial(jax.jit, static_argnames=("batch", "jitter"))
def textures_from_bank(
  key: jax.Array, bank: jax.Array, batch: int, *, jitter: bool = True
) -> jax.Array:
  """`batch` random textures (batch, H, W, 3) in [0, 1] from a bank (N, H, W, 3).

  Picks bank entries uniformly with replacement and shows each through a random flip /
  rotation / zoom and, with `jitter`, a random colour change. `bank` is a device array
  in [0, 1] (float) or uint8 (divided by 255), at the size of the images it will be
  pasted into, e.g. `jnp.asarray(load_texture_folder(dtd_dir, 224))` put once on device.
  """
  seed = rng.seed(key)
  if bank.dtype == jnp.uint8:
    bank = bank.astype(jnp.float32) / 255.0
  picks = rng.pick(rng.uniform(seed, rng.STREAM_PARAMS, jnp.arange(batch)), bank.shape[0])
  return _views(seed, bank[picks], jitter)

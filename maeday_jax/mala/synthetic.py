"""Synthetic anomalies for MALA's second stage: DRAEM's Perlin-mask generator, in JAX.

DRAEM (Zavrtanik et al., ICCV 2021) makes a training defect out of a normal image by
pasting a foreign texture through a random Perlin-noise blob:

  out = image * (1 - m) + (1 - beta) * texture * m + beta * image * m

with m the thresholded (rotated) Perlin noise and beta ~ U(0, 0.8). A segmenter trained
on (out, m) learns "what does not belong here" without ever seeing a real defect.

Everything here works on float32 RGB images (B, H, W, 3) in [0, 1] (the caller converts
to and from the model's normalisation) and is a pure function of a PRNG key, jitted, so
the whole generator runs on device inside the training step. Differences from DRAEM's
NumPy/imgaug code, all made so that one compiled program covers every random draw:

- Perlin noise is evaluated at continuous lattice coordinates `pixel * scale / size`,
  so the per-axis scale 2**randint(0, 7) is a traced number, not a shape (DRAEM needs
  the size divisible by the scale; here any size works). The gradient of lattice point
  (i, j) is a hash of (i, j) and the key instead of an entry of a drawn table: the same
  uniform random angles, on an unbounded lattice, with no table to gather from.
- The rotation by U[-90, 90) degrees samples the noise at rotated coordinates instead of
  rotating a noise image, so the rotated corners hold noise too (imgaug fills them with
  0, i.e. never anomalous there).
- The foreign textures come from the other images of the batch, from procedural
  patterns, or from a texture bank such as DTD loaded once (`load_texture_folder`), each
  with random flips, rotations and colour jitter on device; DRAEM uses DTD and imgaug.

Each public function turns its key into two 32-bit seed words with one small
`jax.random.bits` call and derives every other random number (per image, per parameter,
per lattice point, per pixel) by hashing counters with them. Elementwise integer hashes
compile in a fraction of the time of one threefry call per parameter or per array (on
CPU, several seconds per function otherwise), and stay deterministic given the key.

Textures sources: `textures_from_images`, `procedural_textures`, `textures_from_bank`
(with `load_texture_folder`). Then `synthesize(key, images, textures)` gives the
anomalous images and their masks.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from maeday_jax import augment

log = logging.getLogger("maeday_jax")

TEXTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# ITU-R 601 luma weights: the grey value of colour jitter and of the foreground estimate.
_GREY = (0.299, 0.587, 0.114)
_FBM_OCTAVES = 4
_NUM_PATTERNS = 5  # fractal noise, blobs, stripes, checkerboard, dots
_CHANNEL_ORDERS = tuple(itertools.permutations(range(3)))
# Random numbers per image of the texture views: 3 flips, the warp, 7 for colour jitter.
_VIEW_UNIFORMS = 3 + augment.NUM_UNIFORMS
_JITTER_UNIFORMS = 7
# Hash streams: the first word hashed, so that no two uses of a seed share numbers.
_STREAM_GRADIENT = 0  # + octave
_STREAM_PARAMS = 16
_STREAM_IMAGE = 17
_STREAM_PIXEL = 18


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
  """(H, W) from an int (square) or a pair, checked positive."""
  hw = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"size must be a positive int or (height, width), got {size!r}.")
  return hw


# ----------------------------------------------------------------------------------------
# Counter-based random numbers.


def _seed(key: jax.Array) -> jax.Array:
  """The two uint32 seed words of a key (typed or raw)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _mix(x: jax.Array) -> jax.Array:
  """Chris Wellons' `lowbias32` integer finaliser: every input bit flips ~half the output."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _to_u32(x) -> jax.Array:
  """Integers (negative ones too, two's complement) as uint32."""
  x = jnp.asarray(x)
  if x.dtype == jnp.uint32:
    return x
  return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)


def _hash(seed: jax.Array, *words) -> jax.Array:
  """A uint32 hash of integer arrays (broadcast together) under `seed` (2,) uint32."""
  h = _mix(seed[0] ^ _mix(seed[1] + jnp.uint32(0x9E3779B9)))
  for word in words:
    h = _mix(h ^ _to_u32(word)) + jnp.uint32(0x9E3779B9)
  return _mix(h)


def _uniform(seed: jax.Array, *words) -> jax.Array:
  """U[0, 1) float32 from `_hash` (24 random bits, exactly representable)."""
  return (_hash(seed, *words) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _child_seeds(seed: jax.Array, stream: int, count: int) -> jax.Array:
  """`count` independent seeds (count, 2) derived from `seed`, one per image."""
  index = jnp.arange(count, dtype=jnp.uint32)[:, None]
  return _hash(seed, stream, index, jnp.arange(2, dtype=jnp.uint32)[None, :])


def _pick(u: jax.Array, n: int) -> jax.Array:
  """An integer in {0, ..., n - 1} from U[0, 1)."""
  return jnp.minimum((u * n).astype(jnp.int32), n - 1)


# ----------------------------------------------------------------------------------------
# Perlin noise and masks.


def _fade(t: jax.Array) -> jax.Array:
  """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0, 1)."""
  return t * t * t * (t * (t * 6 - 15) + 10)


def _noise_at(seed: jax.Array, u: jax.Array, v: jax.Array, stream: int = 0) -> jax.Array:
  """Gradient noise at lattice coordinates (u, v) (any real values, broadcast together).

  Same formula as DRAEM's `rand_perlin_2d`, including its sqrt(2) factor that brings
  the values to [-1, 1]; the unit gradient of lattice point (i, j) has the angle
  2 pi * U[0, 1) hashed from (stream, i, j) under `seed`.
  """
  u, v = jnp.broadcast_arrays(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32))
  u0, v0 = jnp.floor(u), jnp.floor(v)
  fu, fv = u - u0, v - v0
  i0, j0 = u0.astype(jnp.int32), v0.astype(jnp.int32)

  def corner(di: int, dj: int) -> jax.Array:
    angle = 2 * math.pi * _uniform(seed, _STREAM_GRADIENT + stream, i0 + di, j0 + dj)
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
  return _noise_at(_seed(key), rows, cols)


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
  return _perlin_noise(key, _as_hw(size), scale)


def _perlin_mask(seed, size, threshold, min_exp, max_exp):
  """`perlin_mask` from a seed (2,) uint32."""
  height, width = size
  u = _uniform(seed, _STREAM_PARAMS, jnp.arange(3))
  exps = min_exp + _pick(u[:2], max_exp - min_exp + 1)
  scale = jnp.exp2(exps.astype(jnp.float32))
  angle = (u[2] - 0.5) * math.pi  # [-90, 90) degrees
  dy = jnp.arange(height, dtype=jnp.float32)[:, None] - (height - 1) / 2
  dx = jnp.arange(width, dtype=jnp.float32)[None, :] - (width - 1) / 2
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_rows = (height - 1) / 2 + cos * dy + sin * dx
  src_cols = (width - 1) / 2 - sin * dy + cos * dx
  noise = _noise_at(seed, src_rows * (scale[0] / height), src_cols * (scale[1] / width))
  return (noise > threshold).astype(jnp.float32)


def _check_exps(min_exp: int, max_exp: int) -> None:
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
  _check_exps(min_exp, max_exp)
  return _perlin_mask(_seed(key), _as_hw(size), threshold, min_exp, max_exp)


# ----------------------------------------------------------------------------------------
# Foreign textures.


def _grey(images: jax.Array) -> jax.Array:
  """Grey value (..., H, W) of RGB images (..., H, W, 3)."""
  return images @ jnp.asarray(_GREY, images.dtype)


def _color_jitter(u: jax.Array, image: jax.Array) -> jax.Array:
  """`color_jitter` set by `_JITTER_UNIFORMS` U[0, 1) numbers."""
  span = lambda i, lo, hi: lo + (hi - lo) * u[i]
  x = image.astype(jnp.float32) * span(0, 0.7, 1.3)
  mean = jnp.mean(_grey(x))
  x = mean + (x - mean) * span(1, 0.6, 1.4)
  grey = _grey(x)[..., None]
  x = jnp.clip(grey + (x - grey) * span(2, 0.4, 1.6), 0.0, 1.0)
  x = x ** jnp.exp(span(3, math.log(0.6), math.log(1.6)))
  # A random one of the 6 channel orders (the identity among them) half of the time.
  x = jnp.where(u[5] < 0.5, x[..., jnp.asarray(_CHANNEL_ORDERS)[_pick(u[4], 6)]], x)
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
  return _color_jitter(_uniform(_seed(key), _STREAM_PARAMS, jnp.arange(_JITTER_UNIFORMS)), image)


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
  u = _uniform(seed, _STREAM_IMAGE, jnp.arange(batch)[:, None], jnp.arange(count)[None, :])
  out = jax.vmap(_random_view)(u[:, :_VIEW_UNIFORMS], images.astype(jnp.float32))
  if jitter:
    out = jax.vmap(_color_jitter)(u[:, _VIEW_UNIFORMS:], out)
  return jnp.clip(out, 0.0, 1.0)


def _other_indices(seed: jax.Array, batch: int) -> jax.Array:
  if batch < 2:
    raise ValueError(f"textures from other images need a batch of at least 2, got {batch}.")
  shift = 1 + _pick(_uniform(seed, _STREAM_PARAMS, 0), batch - 1)
  return jnp.mod(jnp.arange(batch) + shift, batch)


@functools.partial(jax.jit, static_argnames=("batch",))
def other_image_indices(key: jax.Array, batch: int) -> jax.Array:
  """A random permutation (batch,) of the batch that maps no index to itself.

  Index b goes to (b + shift) % batch with shift ~ U{1, ..., batch - 1}: every image
  lends its content to exactly one other image. Needs batch >= 2. The permutation
  `textures_from_images(key, ...)` uses.
  """
  return _other_indices(_seed(key), batch)


@functools.partial(jax.jit, static_argnames=("jitter",))
def textures_from_images(key: jax.Array, images: jax.Array, *, jitter: bool = True) -> jax.Array:
  """Foreign textures (B, H, W, 3) in [0, 1] cut from the other normal images of the batch.

  Image b gets the content of image `other_image_indices(key, B)[b]` (never itself),
  seen through a random flip / rotation / zoom and, with `jitter`, a random colour change
  (`color_jitter`). Needs B >= 2. No dataset needed, but on texture categories the
  "foreign" texture is the same material, which makes subtle anomalies; mix with
  `procedural_textures` or a texture bank for variety.
  """
  seed = _seed(key)
  source = _other_indices(seed, images.shape[0])
  return _views(seed, images[source], jitter)


def texture_views(key: jax.Array, images: jax.Array, *, jitter: bool = True) -> jax.Array:
  """Each image (B, H, W, 3) in [0, 1] seen through a random flip / rotation / zoom and,
  with `jitter`, a random colour change: the textures of `textures_from_images` without
  the exchange between images (for a batch of one)."""
  return _views(_seed(key), images, jitter)


def _fractal(seed: jax.Array, rows: jax.Array, cols: jax.Array, base: jax.Array) -> jax.Array:
  """Multi-octave Perlin noise (fBm), standardised per image to mean 0, std 1."""
  total = 0.0
  for octave in range(_FBM_OCTAVES):
    s = base * 2.0**octave
    total = total + 0.5**octave * _noise_at(seed, rows * s[0], cols * s[1], stream=octave)
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
  r = _uniform(seed, _STREAM_PARAMS, jnp.arange(len(_P)))
  span = lambda name, lo, hi: lo + (hi - lo) * r[_P[name]]
  log_span = lambda name, lo, hi: jnp.exp(span(name, math.log(lo), math.log(hi)))

  rows = jnp.arange(height, dtype=jnp.float32)[:, None] / height  # in [0, 1)
  cols = jnp.arange(width, dtype=jnp.float32)[None, :] / width
  # Base scale 1..8 cells per side and axis; 4 octaves reach 64.
  base = jnp.exp2(_pick(r[jnp.asarray([_P["base_row"], _P["base_col"]])], 4).astype(jnp.float32))
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
  first = fields[_pick(r[_P["kind_a"]], _NUM_PATTERNS)]
  second = fields[_pick(r[_P["kind_b"]], _NUM_PATTERNS)]
  field = (1 - mix) * first + mix * second
  colours = r[_P["colour0"] : _P["colour0"] + 9].reshape(3, 3)
  rgb = colours[0] + (colours[1] - colours[0]) * field[..., None]
  # A slow tint towards a third colour, and a little grain, so flat areas are not flat.
  slow = _noise_at(seed, rows * 3.0, cols * 3.0, stream=_FBM_OCTAVES)
  tint = jax.nn.sigmoid(6.0 * slow) * span("tint", 0.0, 0.5)
  rgb = rgb + (colours[2] - rgb) * tint[..., None]
  pixel = jnp.arange(height)[:, None] * width + jnp.arange(width)[None, :]
  grain = (_uniform(seed, _STREAM_PIXEL, pixel) - 0.5) * span("grain", 0.0, 0.12)
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
  hw = _as_hw(size)
  seeds = _child_seeds(_seed(key), _STREAM_IMAGE, batch)
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
  seed = _seed(key)
  if bank.dtype == jnp.uint8:
    bank = bank.astype(jnp.float32) / 255.0
  picks = _pick(_uniform(seed, _STREAM_PARAMS, jnp.arange(batch)), bank.shape[0])
  return _views(seed, bank[picks], jitter)


def _read_texture(path: pathlib.Path, hw: tuple[int, int]) -> np.ndarray:
  """One texture file, centre-cropped to the aspect of `hw` and resized, uint8 RGB."""
  height, width = hw
  with Image.open(path) as opened:
    opened.load()  # decode fully now, so a truncated file fails here
    image = opened
    try:
      image = ImageOps.exif_transpose(opened)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
      image = opened
    image = image.convert("RGB")
  w, h = image.size
  if w * height > h * width:  # too wide: crop columns
    crop_w = max(1, round(h * width / height))
    left = (w - crop_w) // 2
    box = (left, 0, left + crop_w, h)
  else:  # too tall (or exact): crop rows
    crop_h = max(1, round(w * height / width))
    top = (h - crop_h) // 2
    box = (0, top, w, top + crop_h)
  # Crop first, then resize: the filter never reaches the pixels that were cropped away.
  image = image.crop(box).resize((width, height), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def load_texture_folder(
  path: str | os.PathLike, size: int | tuple[int, int], max_images: int | None = None
) -> np.ndarray:
  """The images of a folder (e.g. DTD) as a texture bank (N, H, W, 3) uint8.

  Searches the folder recursively for .jpg/.jpeg/.png/.bmp files (any case; hidden files
  and folders, e.g. macOS `._` files, are ignored), centre-crops each to the aspect of
  `size` (square for an int) and resizes it with Pillow (bicubic, antialiased). A file
  that cannot be read is skipped with a logged warning naming it. With `max_images`, at
  most that many are read, chosen in a fixed pseudo-random order (seed 0) so a subset of
  DTD covers all its categories; the result keeps the sorted order of the files.

  Raises:
    ValueError: naming the folder, when it does not exist, holds no image file or no
      readable one.
  """
  hw = _as_hw(size)
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise ValueError(f"Texture folder {folder} does not exist or is not a folder.")
  if max_images is not None and max_images < 1:
    raise ValueError(f"max_images must be >= 1 or None, got {max_images}.")
  files = sorted(
    p
    for p in folder.rglob("*")
    if p.suffix.lower() in TEXTURE_EXTENSIONS
    and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    and p.is_file()
  )
  if not files:
    raise ValueError(
      f"Texture folder {folder} holds no image file ({', '.join(TEXTURE_EXTENSIONS)})."
    )
  order = range(len(files))
  if max_images is not None and max_images < len(files):
    order = np.random.default_rng(0).permutation(len(files))
  read: dict[int, np.ndarray] = {}
  skipped = 0
  for index in order:
    try:
      read[int(index)] = _read_texture(files[index], hw)
    except Exception as e:  # one bad file (whatever Pillow raises) never fails the others
      log.warning("Skipping unreadable texture %s: %s", files[index], e)
      skipped += 1
      continue
    if max_images is not None and len(read) == max_images:
      break
  if not read:
    raise ValueError(
      f"Texture folder {folder} holds no readable image ({skipped} unreadable image "
      "files skipped; see the warnings)."
    )
  return np.stack([read[i] for i in sorted(read)])


# ----------------------------------------------------------------------------------------
# Foreground and the blend.


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
  grey = _grey(images.astype(jnp.float32))
  # 3x3 mean (edge-padded) so single noisy pixels do not count as foreground.
  padded = jnp.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
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
  _check_exps(min_exp, max_exp)
  if not 0.0 <= anomaly_prob <= 1.0:
    raise ValueError(f"anomaly_prob must be in [0, 1], got {anomaly_prob}.")
  low, high = beta_range
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f"beta_range must satisfy 0 <= low <= high <= 1, got {beta_range}.")
  batch, height, width, _ = images.shape
  if textures.shape != images.shape:
    raise ValueError(f"textures {textures.shape} must have the shape of images {images.shape}.")
  seed = _seed(key)
  masks = jax.vmap(lambda s: _perlin_mask(s, (height, width), threshold, min_exp, max_exp))(
    _child_seeds(seed, _STREAM_IMAGE, batch)
  )
  u = _uniform(seed, _STREAM_PARAMS, jnp.arange(batch)[:, None], jnp.arange(2)[None, :])
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

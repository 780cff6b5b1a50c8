"""PMAD's combinational training masks over a patch grid, as pure jittable functions.

A mask is a bool vector (N,) over the row-major patch grid (gh, gw), N = gh * gw, True for a
masked patch; every strategy masks exactly `num_masked` patches. Each function takes an
explicit PRNG key and one image's inputs, so it vmaps over keys and images:

- `random_mask`: a uniform `num_masked`-subset.
- `blockwise_mask`: BEiT's rectangles of random area and aspect ratio, topped up to the
  exact count with the patches nearest to the blocks.
- `weighted_mask`: sampling without replacement with probability proportional to weights
  (Gumbel top-k), fed by `frequency_weights` (high-frequency energy per patch),
  `dynamic_weights` (where the model currently reconstructs worst, from the running error
  that `update_error_ema` keeps) and `region_weights` (the foreground, e.g. from
  `foreground_from_images`).
- `mixed_masks`: each image of a batch draws one of the `STRATEGIES` with given
  probabilities.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("random", "blockwise", "frequency", "dynamic", "region")

# Fraction of the weight mass spread evenly over all patches, so every patch can be chosen.
FLOOR = 0.1
# Region weighting: a foreground patch weighs this much, a background patch 1.
INSIDE = 3.0
# BEiT's blocks: smallest block area (patches), largest aspect ratio, and how many failed
# proposals in a row end the block loop.
MIN_BLOCK = 4
MAX_ASPECT = 3.0
BLOCK_ATTEMPTS = 10
# Score of a zero-weight patch in `weighted_mask`: below every positive weight's score
# (log-weights relative to the largest are >= -200, Gumbel noise lies in about [-5, 17]).
_ZERO_WEIGHT_SCORE = -1000.0


def _check_count(num_patches: int, num_masked: int) -> None:
  if not 0 <= num_masked <= num_patches:
    raise ValueError(
      f"num_masked={num_masked} must lie in [0, {num_patches}] (the number of patches)."
    )


def _mask_from_priority(priority: jax.Array, num_masked: int) -> jax.Array:
  """Bool (N,) with the `num_masked` highest priorities True (ties: lower index first)."""
  if num_masked == 0:
    return jnp.zeros(priority.shape, bool)
  _, index = jax.lax.top_k(priority, num_masked)
  return jnp.zeros(priority.shape, bool).at[index].set(True)


@functools.partial(jax.jit, static_argnames=("grid", "num_masked"))
def random_mask(key: jax.Array, grid: tuple[int, int], num_masked: int) -> jax.Array:
  """Bool (gh * gw,): a uniformly random `num_masked`-subset of the grid's patches."""
  num_patches = grid[0] * grid[1]
  _check_count(num_patches, num_masked)
  return _mask_from_priority(jax.random.uniform(key, (num_patches,)), num_masked)


def _manhattan_distance(mask: jax.Array) -> jax.Array:
  """Grid distance (gh, gw) of every cell to the nearest True cell of `mask` (gh, gw);
  gh + gw everywhere when `mask` is empty."""
  gh, gw = mask.shape
  far = gh + gw
  dist = jnp.where(mask, 0, far).astype(jnp.int32)

  def relax(_, d):
    pad = jnp.pad(d, 1, constant_values=far)
    neighbours = jnp.minimum(
      jnp.minimum(pad[:-2, 1:-1], pad[2:, 1:-1]), jnp.minimum(pad[1:-1, :-2], pad[1:-1, 2:])
    )
    return jnp.minimum(d, neighbours + 1)

  return jax.lax.fori_loop(0, gh + gw - 2, relax, dist)


def _uniform_below(u: jax.Array, n: jax.Array) -> jax.Array:
  """An integer uniform in [0, n) from u ~ U[0, 1)."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


@functools.partial(jax.jit, static_argnames=("grid", "num_masked", "min_block", "max_aspect"))
def blockwise_mask(
  key: jax.Array,
  grid: tuple[int, int],
  num_masked: int,
  min_block: int = MIN_BLOCK,
  max_aspect: float = MAX_ASPECT,
) -> jax.Array:
  """Bool (gh * gw,): BEiT's blockwise mask with exactly `num_masked` patches.

  BEiT's loop (`MaskingGenerator`), in `lax.while_loop`: while fewer than `num_masked`
  patches are masked, propose a rectangle of area uniform between `min_block` and the
  remaining budget and aspect ratio log-uniform in [1 / max_aspect, max_aspect] (height
  round(sqrt(area * aspect)), width round(sqrt(area / aspect)), both strictly smaller than
  the grid, as BEiT), at a uniform position; keep it if it adds at least one and at most
  the remaining budget of new patches. `BLOCK_ATTEMPTS` (10) rejected proposals in a row
  end the loop, as in BEiT, which can therefore stop below the budget: the rest is then
  filled with the unmasked patches nearest (Manhattan distance on the grid, ties uniformly
  at random) to the blocks, so the top-up grows the blocks rather than scattering patches.
  """
  gh, gw = grid
  num_patches = gh * gw
  _check_count(num_patches, num_masked)
  if min_block < 1 or max_aspect < 1.0:
    raise ValueError(f"Need min_block >= 1 and max_aspect >= 1, got {min_block}, {max_aspect}.")
  if num_masked == 0:
    return jnp.zeros((num_patches,), bool)
  rows = jnp.arange(gh)[:, None]
  cols = jnp.arange(gw)[None, :]
  log_aspect = math.log(max_aspect)
  loop_key, fill_key = jax.random.split(key)

  def propose(state):
    key, mask, count, failures = state
    key, sub = jax.random.split(key)
    u_area, u_aspect, u_top, u_left = jax.random.uniform(sub, (4,))
    remaining = num_masked - count
    # uniform(lo, hi) as Python's random.uniform: also for lo > hi (budget < min_block).
    area = min_block + (remaining - min_block) * u_area
    aspect = jnp.exp(log_aspect * (2.0 * u_aspect - 1.0))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < gh) & (w < gw)
    top = _uniform_below(u_top, jnp.maximum(gh - h, 0) + 1)
    left = _uniform_below(u_left, jnp.maximum(gw - w, 0) + 1)
    block = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    added = jnp.sum(block & ~mask)
    accept = fits & (added > 0) & (added <= remaining)
    return (
      key,
      jnp.where(accept, mask | block, mask),
      count + jnp.where(accept, added, 0),
      jnp.where(accept, 0, failures + 1),
    )

  def unfinished(state):
    _, _, count, failures = state
    return (count < num_masked) & (failures < BLOCK_ATTEMPTS)

  init = (loop_key, jnp.zeros((gh, gw), bool), jnp.int32(0), jnp.int32(0))
  _, mask, _, _ = jax.lax.while_loop(unfinished, propose, init)
  # Masked patches (distance 0) rank first, then the nearest unmasked ones.
  distance = _manhattan_distance(mask).astype(jnp.float32)
  priority = -distance + 0.5 * jax.random.uniform(fill_key, (gh, gw))
  return _mask_from_priority(priority.reshape(num_patches), num_masked)


@functools.partial(jax.jit, static_argnames=("num_masked",))
def weighted_mask(key: jax.Array, weights: jax.Array, num_masked: int) -> jax.Array:
  """Bool (N,): `num_masked` patches drawn without replacement, each next draw with
  probability proportional to `weights` (N,) (>= 0) of the patches left.

  Gumbel top-k: the `num_masked` largest log(weight) + Gumbel noise. Zero (or negative)
  weights are drawn only when fewer than `num_masked` weights are positive, uniformly among
  themselves; all weights zero: uniform.
  """
  num_patches = weights.shape[-1]
  _check_count(num_patches, num_masked)
  weights = weights.astype(jnp.float32)
  positive = weights > 0
  log_w = jnp.log(jnp.where(positive, weights, 1.0))
  log_w = jnp.maximum(log_w - jnp.max(jnp.where(positive, log_w, -jnp.inf)), -200.0)
  gumbel = jax.random.gumbel(key, (num_patches,))
  score = jnp.where(positive, log_w, _ZERO_WEIGHT_SCORE) + gumbel
  return _mask_from_priority(score, num_masked)


def _check_floor(floor: float) -> None:
  if not 0.0 < floor <= 1.0:
    raise ValueError(f"floor={floor} must lie in (0, 1] (the weight share spread evenly).")


def _normalise_with_floor(energy: jax.Array, floor: float) -> jax.Array:
  """Non-negative `energy` (..., N) -> weights summing to 1 along N: (1 - floor) of the mass
  in proportion to the energy, `floor` spread evenly (all even when the energy is 0)."""
  num_patches = energy.shape[-1]
  total = jnp.sum(energy, axis=-1, keepdims=True)
  share = jnp.where(total > 0, energy / jnp.where(total > 0, total, 1.0), 1.0 / num_patches)
  return (1.0 - floor) * share + floor / num_patches


def _grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
  if height % patch_size or width % patch_size:
    raise ValueError(
      f"Image size {height}x{width} is not a multiple of patch_size={patch_size}; "
      "resize or crop the images to whole patches."
    )
  return height // patch_size, width // patch_size


def _patch_means(x: jax.Array, patch_size: int) -> jax.Array:
  """Means (B, N, ...) of `x` (B, H, W, ...) over each patch, patches row-major."""
  b, h, w = x.shape[:3]
  gh, gw = _grid(h, w, patch_size)
  rest = x.shape[3:]
  x = x.reshape(b, gh, patch_size, gw, patch_size, *rest)
  return x.mean(axis=(2, 4)).reshape(b, gh * gw, *rest)


def frequency_weights(images: jax.Array, patch_size: int, floor: float = FLOOR) -> jax.Array:
  """Weights (B, N) summing to 1 per image: high-frequency energy of each patch.

  The energy is the mean absolute 4-neighbour Laplacian of the grey image (the mean over
  channels; edge pixels replicated) over the patch: 0 on flat areas and linear ramps,
  large on texture and edges. A share `floor` of the weight is spread evenly so that flat
  patches can still be chosen; a flat image gets uniform weights.
  """
  _check_floor(floor)
  grey = images.astype(jnp.float32).mean(axis=-1)
  pad = jnp.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
  laplacian = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
  laplacian = laplacian - 4.0 * grey
  return _normalise_with_floor(_patch_means(jnp.abs(laplacian), patch_size), floor)


def dynamic_weights(patch_errors: jax.Array, floor: float = FLOOR) -> jax.Array:
  """Weights (N,) or (B, N), summing to 1 along N, proportional to the running
  reconstruction error per patch position (negative errors count as 0), with a share
  `floor` spread evenly; all-zero errors (a fresh running mean) give uniform weights."""
  _check_floor(floor)
  return _normalise_with_floor(jnp.maximum(patch_errors.astype(jnp.float32), 0.0), floor)


def update_error_ema(
  ema: jax.Array, errors: jax.Array, masks: jax.Array, decay: float
) -> jax.Array:
  """The running per-position error (N,) after one batch.

  `errors` and `masks` are (B, N) (or (N,) for one image): the reconstruction error of each
  patch and whether it was masked. A position masked in at least one image moves to
  decay * ema + (1 - decay) * (its mean error over the images where it was masked);
  the others keep their value. Errors at unmasked positions are ignored (even NaN).
  """
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"decay={decay} must lie in [0, 1).")
  errors = jnp.atleast_2d(errors).astype(jnp.float32)
  masks = jnp.atleast_2d(masks).astype(bool)
  count = masks.sum(axis=0)
  total = jnp.where(masks, errors, 0.0).sum(axis=0)
  mean = total / jnp.maximum(count, 1)
  ema = ema.astype(jnp.float32)
  return jnp.where(count > 0, decay * ema + (1.0 - decay) * mean, ema)


def region_weights(foreground: jax.Array, inside: float = INSIDE) -> jax.Array:
  """Weights (B, N): 1 + (inside - 1) * foreground, for `foreground` (B, N) in [0, 1]
  (clipped): a foreground patch is `inside` times as likely to be drawn next as a
  background one."""
  if not inside > 0:
    raise ValueError(f"inside={inside} must be positive.")
  return 1.0 + (inside - 1.0) * jnp.clip(foreground.astype(jnp.float32), 0.0, 1.0)


def foreground_from_images(images: jax.Array, patch_size: int, threshold: float = 1.0) -> jax.Array:
  """A cheap soft foreground (B, N) in [0, 1] from the images (B, H, W, C) alone.

  Assumes the border of the picture shows background (the usual inspection shot: an
  object in front of a plain backdrop). Each patch's mean colour is compared with the
  per-channel median of the mean colours of the outer ring of patches; the Euclidean
  distance, divided by `threshold` times the image's pixel standard deviation (so the
  estimate does not depend on the value range), clipped to [0, 1], is the foreground.
  A patch whose colour is at least one image standard deviation from the border's reads
  1; a flat image reads 0, white noise about sqrt(C) / patch_size.
  """
  if not threshold > 0:
    raise ValueError(f"threshold={threshold} must be positive.")
  b, h, w, _ = images.shape
  gh, gw = _grid(h, w, patch_size)
  x = images.astype(jnp.float32)
  colours = _patch_means(x, patch_size)  # (B, N, C)
  # A NumPy (static) index: a traced boolean index cannot be used under `jax.jit`.
  ring = np.zeros((gh, gw), bool)
  ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
  ring = ring.reshape(-1)
  background = jnp.median(colours[:, ring], axis=1)  # (B, C)
  distance = jnp.linalg.norm(colours - background[:, None], axis=-1)
  scale = threshold * jnp.std(x.reshape(b, -1), axis=-1, keepdims=True)
  return jnp.clip(distance / jnp.maximum(scale, 1e-12), 0.0, 1.0)


def _check_probabilities(probabilities: Mapping[str, float]) -> dict[str, float]:
  unknown = sorted(set(probabilities) - set(STRATEGIES))
  if unknown:
    raise ValueError(f"Unknown masking strategies {unknown}; choose from {STRATEGIES}.")
  probs = {name: float(probabilities.get(name, 0.0)) for name in STRATEGIES}
  if any(not (p >= 0 and math.isfinite(p)) for p in probs.values()):
    raise ValueError(f"Masking probabilities must be finite and >= 0, got {dict(probabilities)}.")
  total = sum(probs.values())
  if total <= 0:
    raise ValueError(f"At least one masking probability must be positive, got {probs}.")
  return {name: p / total for name, p in probs.items()}


def mixed_masks(
  key: jax.Array,
  images: jax.Array,
  patch_size: int,
  num_masked: int,
  probabilities: Mapping[str, float],
  error_ema: jax.Array | None = None,
  *,
  min_block: int = MIN_BLOCK,
  max_aspect: float = MAX_ASPECT,
  floor: float = FLOOR,
  inside: float = INSIDE,
) -> jax.Array:
  """Bool masks (B, N) for images (B, H, W, C): each image draws one of the `STRATEGIES`
  with `probabilities` (normalised by their sum; names left out count 0) and gets that
  strategy's mask of exactly `num_masked` patches.

  Keys: `choice_key, mask_key = split(key)`; image b uses `split(mask_key, B)[b]` whatever
  its strategy, and the strategies are drawn with `choice_key`. Only strategies with a
  positive probability are computed (each for the whole batch, then selected per image);
  "dynamic" needs `error_ema` (N,) (see `update_error_ema`). Not jitted itself
  (`patch_size`, `num_masked` and `probabilities` are Python values): call it inside
  `jax.jit`.
  """
  b, h, w, _ = images.shape
  grid = _grid(h, w, patch_size)
  num_patches = grid[0] * grid[1]
  _check_count(num_patches, num_masked)
  probs = _check_probabilities(probabilities)
  active = [name for name in STRATEGIES if probs[name] > 0]
  if "dynamic" in active and (error_ema is None or error_ema.shape[-1] != num_patches):
    got = None if error_ema is None else error_ema.shape
    raise ValueError(
      f"The 'dynamic' strategy needs error_ema of shape ({num_patches},), got {got}."
    )
  choice_key, mask_key = jax.random.split(key)
  keys = jax.random.split(mask_key, b)

  def weighted(weights):
    return jax.vmap(lambda k, wt: weighted_mask(k, wt, num_masked))(keys, weights)

  candidates = []
  for name in active:
    if name == "random":
      masks = jax.vmap(lambda k: random_mask(k, grid, num_masked))(keys)
    elif name == "blockwise":
      masks = jax.vmap(lambda k: blockwise_mask(k, grid, num_masked, min_block, max_aspect))(keys)
    elif name == "frequency":
      masks = weighted(frequency_weights(images, patch_size, floor))
    elif name == "dynamic":
      masks = weighted(jnp.broadcast_to(dynamic_weights(error_ema, floor), (b, num_patches)))
    else:  # "region"
      masks = weighted(region_weights(foreground_from_images(images, patch_size), inside))
    candidates.append(masks)
  if len(candidates) == 1:
    return candidates[0]
  p = jnp.asarray([probs[name] for name in active])
  choice = jax.random.choice(choice_key, len(active), (b,), p=p)
  return jnp.take_along_axis(jnp.stack(candidates), choice[None, :, None], axis=0)[0]

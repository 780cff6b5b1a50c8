"""PatchCore (Roth et al. 2022) as anomalib 2.x computes it, in JAX.

Pipeline (each step a pure function below, compared one by one with NumPy in the tests):

1. `embed`: backbone features of "layer2" (stride 8) and "layer3" (stride 16), each 3x3
   average-pooled (stride 1, zero padding 1 counted in the division: torch
   `AvgPool2d(3, 1, 1)`), layer3 resized to layer2's grid (torch
   `F.interpolate(mode="bilinear", align_corners=False)`), concatenated layer2 first:
   one vector per layer2 location (1536-D for WideResNet-50-2, 28 x 28 at 224 px).
2. `fit`: the memory bank, a greedy k-center coreset (`coreset_indices`) of
   `floor(n * coreset_ratio)` of the n shot embeddings, chosen on a sparse random
   projection (`sparse_random_projection`), as anomalib's `KCenterGreedy`.
3. `score`: each test patch's Euclidean distance to its nearest bank row (`nearest`);
   the pixel map (`anomaly_map`) is that (h, w) grid upsampled by nearest neighbour and
   Gaussian-blurred (sigma 4, 33 taps, reflect borders); the image score (`image_score`)
   re-weights the largest patch distance by its bank neighbourhood, anomalib's
   `compute_anomaly_score`.

The coreset (`maeday_jax.coreset`) and the nearest-neighbour search
(`maeday_jax.nearest_neighbors`) are generic and live in their own modules; their names
are importable from here too (`patchcore.nearest`, `patchcore.coreset_indices`, ...).
Memory stays bounded: the coreset loop computes one center's distances to the rows in
chunks of `chunk_size` rows (never an n x n matrix), and nearest-neighbour search runs
over the bank in chunks of `chunk_size` rows (never a patches x bank matrix larger than
patches x chunk). The coreset rows are split over a 1-D device mesh (`shard_map`); each
selection is a max/min all-reduce across devices, so 1 and 8 devices select the same rows.

Typical use::

  bank = patchcore.fit(model, variables, shots, key, coreset_ratio=0.1)
  maps, scores = patchcore.score(model, variables, bank, images)  # (B, H, W), (B,)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from maeday_jax import nearest_neighbors, parallel
from maeday_jax.blur import gaussian_blur
from maeday_jax.coreset import (
  CORESET_CHUNK_SIZE,
  DEFAULT_CORESET_RATIO,
  PROJECTION_EPS,
  coreset_indices,
  coreset_size,
  coreset_start,
  johnson_lindenstrauss_dim,
  kcenter_greedy,
  sparse_random_projection,
)
from maeday_jax.nearest_neighbors import BANK_CHUNK_SIZE, nearest

# The public names, with those that moved to `coreset` and `nearest_neighbors` (kept
# importable from here for existing callers).
__all__ = [
  "BANK_CHUNK_SIZE",
  "BLUR_SIGMA",
  "BLUR_SIZE",
  "CORESET_CHUNK_SIZE",
  "DEFAULT_CORESET_RATIO",
  "EMBED_BATCH",
  "LAYERS",
  "NUM_NEIGHBORS",
  "PROJECTION_EPS",
  "MemoryBank",
  "anomaly_map",
  "coreset_indices",
  "coreset_size",
  "coreset_start",
  "embed",
  "fit",
  "image_score",
  "johnson_lindenstrauss_dim",
  "kcenter_greedy",
  "make_scorer",
  "nearest",
  "resize_bilinear",
  "score",
  "sparse_random_projection",
]

LAYERS = ("layer2", "layer3")
# anomalib `PatchcoreModel(num_neighbors=9)`: support set of the image score.
NUM_NEIGHBORS = 9
# anomalib `AnomalyMapGenerator(sigma=4)`, kernel size `2 * int(4 * sigma + 0.5) + 1`.
BLUR_SIGMA = 4.0
BLUR_SIZE = 2 * int(4.0 * BLUR_SIGMA + 0.5) + 1  # 33 taps
# Shots run through the backbone at once when fitting a bank.
EMBED_BATCH = 16


@struct.dataclass
class MemoryBank:
  """A fitted PatchCore memory bank (a frozen pytree, so it can be passed to `jax.jit`).

  Attributes:
    rows: (M, D) float32 bank embeddings, in coreset selection order.
    grid: (h, w) feature grid of the shots the bank was fitted on (for reference).
    num_neighbors: size of the bank neighbourhood used by `image_score`.
  """

  rows: jax.Array
  grid: tuple[int, int] = struct.field(pytree_node=False, default=(0, 0))
  num_neighbors: int = struct.field(pytree_node=False, default=NUM_NEIGHBORS)


# --------------------------------------------------------------------------- embedding


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """torch `AvgPool2d(3, stride=1, padding=1)` on NHWC: zero padding counts (sum / 9)."""
  summed = jax.lax.reduce_window(
    x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  )
  return summed / 9.0


def _linear_taps(in_size: int, out_size: int):
  """Source pixels and weights of torch's bilinear resize along one axis.

  `align_corners=False` with an explicit output size: src = (dst + 0.5) * in / out - 0.5,
  clamped at 0; the right tap is clamped to the last pixel (no antialiasing).
  """
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0).astype(np.float32)
  return i0, i1, (1.0 - lam).astype(np.float32), lam


@functools.partial(jax.jit, static_argnames=("size",))
def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(B, h, w, C) -> (B, H, W, C) as torch `F.interpolate(mode="bilinear")` (align_corners=False).

  Written out with torch's source-index arithmetic (width then height, as torch's
  kernel), so it matches for any size; for upsampling it equals
  `jax.image.resize(..., "linear", antialias=False)`.
  """
  out_h, out_w = size
  h0, h1, hw0, hw1 = _linear_taps(x.shape[1], out_h)
  w0, w1, ww0, ww1 = _linear_taps(x.shape[2], out_w)
  x = x[:, :, w0] * ww0[:, None] + x[:, :, w1] * ww1[:, None]
  return x[:, h0] * hw0[:, None, None] + x[:, h1] * hw1[:, None, None]


@functools.partial(jax.jit, static_argnames=("model", "layers"))
def embed(model: Any, variables: Any, images: jax.Array, layers: Sequence[str] = LAYERS):
  """PatchCore embeddings (B, h, w, D) float32 of `images` (B, H, W, 3), ImageNet-normalised.

  `model.apply(variables, images, stages=layers)` gives NHWC features per stage; each is
  3x3 average-pooled (zero padding counted), every later stage is resized to the first
  stage's grid (bilinear, align_corners=False) and the stages are concatenated in order
  (anomalib's `generate_embedding`).
  """
  layers = tuple(layers)
  features = model.apply(variables, images, stages=layers)
  pooled = [_avg_pool_3x3(features[name].astype(jnp.float32)) for name in layers]
  grid = pooled[0].shape[1:3]
  resized = [pooled[0]] + [resize_bilinear(f, grid) for f in pooled[1:]]
  return jnp.concatenate(resized, axis=-1)


# --------------------------------------------------------------------------- memory bank


def fit(
  model: Any,
  variables: Any,
  shots: jax.Array,
  key: jax.Array,
  coreset_ratio: float = DEFAULT_CORESET_RATIO,
  *,
  chunk_size: int = CORESET_CHUNK_SIZE,
  mesh=None,
  num_neighbors: int = NUM_NEIGHBORS,
) -> MemoryBank:
  """The memory bank of the normal `shots` (K, H, W, 3), ImageNet-normalised.

  All K * h * w embeddings (`embed`) form the candidates; `coreset_indices(embeddings, key,
  coreset_ratio)` chooses the rows kept (sharded over `mesh`, default every device).
  """
  # The backbone runs on `EMBED_BATCH` shots at a time: a few hundred shots then need
  # memory for their embeddings (K x h x w x D floats), not for all their activations.
  embeddings = jnp.concatenate(
    [
      embed(model, variables, shots[i : i + EMBED_BATCH])
      for i in range(0, shots.shape[0], EMBED_BATCH)
    ]
  )
  _, h, w, dim = embeddings.shape
  flat = embeddings.reshape(-1, dim)
  indices = coreset_indices(flat, key, coreset_ratio, chunk_size=chunk_size, mesh=mesh)
  # The indices are replicated over the mesh: any local copy holds all of them.
  rows = flat if coreset_ratio == 1.0 else flat[np.asarray(indices.addressable_data(0))]
  return MemoryBank(rows=rows, grid=(int(h), int(w)), num_neighbors=num_neighbors)


# ----------------------------------------------------------------------------- scoring


def _nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
  """torch `F.interpolate(mode="nearest")` source pixels: floor(dst * in / out).

  As torch computes it: identity for equal sizes, `dst >> 1` for doubling, otherwise
  `floorf(dst * (float)in / out)` in float32, clamped to the last pixel.
  """
  dst = np.arange(out_size)
  if out_size == in_size:
    return dst
  if out_size == 2 * in_size:
    return dst >> 1
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(dst.astype(np.float32) * scale).astype(np.int64)
  return np.minimum(src, in_size - 1)


@functools.partial(jax.jit, static_argnames=("size",))
def anomaly_map(patch_distances: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Pixel maps (B, H, W) from the patch distances (B, h, w): anomalib's `AnomalyMapGenerator`.

  Nearest-neighbour upsampling to `size` (torch `F.interpolate` default mode), then a
  normalised Gaussian of sigma 4 with `2 * int(4 * sigma + 0.5) + 1` = 33 taps, reflect
  borders (the edge pixel is not repeated; scipy's `mode="mirror"`), applied as two 1-D
  passes. Raw distances: no normalisation.
  """
  out_h, out_w = size
  rows = _nearest_source_indices(patch_distances.shape[-2], out_h)
  cols = _nearest_source_indices(patch_distances.shape[-1], out_w)
  upsampled = patch_distances[..., rows[:, None], cols[None, :]]
  return gaussian_blur(upsampled.astype(jnp.float32), BLUR_SIZE, BLUR_SIGMA)


@functools.partial(jax.jit, static_argnames=("num_neighbors", "chunk_size"))
def image_score(
  patch_distances: jax.Array,
  nn_index: jax.Array,
  patches: jax.Array,
  bank: jax.Array,
  num_neighbors: int = NUM_NEIGHBORS,
  chunk_size: int = BANK_CHUNK_SIZE,
) -> jax.Array:
  """Image scores (B,): anomalib's `PatchcoreModel.compute_anomaly_score`.

  Args:
    patch_distances: (B, P) each patch's distance to its nearest bank row (`nearest`).
    nn_index: (B, P) that row's index.
    patches: (B, P, D) the test embeddings.
    bank: (M, D) bank rows.
    num_neighbors: neighbourhood size (9 in anomalib); min(num_neighbors, M) rows are used,
      so a bank of fewer rows uses all of them.
    chunk_size: bank rows per chunk of the neighbour search.

  For each image: s* = the largest patch distance (first patch on ties), m* = that patch's
  nearest bank row; the `num_neighbors` bank rows nearest to m* (m* itself first, the
  others by distance); d = distances of that test patch to those rows; the score is
  s* x (1 - softmax(d)[0]). With a single bank row the score is 0, as in anomalib.
  """
  batch = jnp.arange(patch_distances.shape[0])
  star = jnp.argmax(patch_distances, axis=-1)
  s_star = patch_distances[batch, star]
  m_star = nn_index[batch, star].astype(jnp.int32)
  test_patch = patches[batch, star].astype(jnp.float32)  # (B, D)
  bank = bank.astype(jnp.float32)
  k = min(num_neighbors, bank.shape[0])
  _, support = nearest_neighbors.k_nearest(
    bank[m_star], bank, k, chunk_size, first=m_star
  )  # (B, k)
  d2 = jax.vmap(lambda p, rows: nearest_neighbors.squared_distances(p[None], rows)[0])(
    test_patch, bank[support]
  )
  weights = 1.0 - jax.nn.softmax(jnp.sqrt(d2), axis=-1)[:, 0]
  return weights * s_star


def _score(model, variables, bank: MemoryBank, images, chunk_size):
  embeddings = embed(model, variables, images)
  num, h, w, dim = embeddings.shape
  patches = embeddings.reshape(num, h * w, dim)
  dist, index = nearest(patches.reshape(-1, dim), bank.rows, chunk_size)
  dist, index = dist.reshape(num, h * w), index.reshape(num, h * w)
  maps = anomaly_map(dist.reshape(num, h, w), tuple(images.shape[1:3]))
  scores = image_score(dist, index, patches, bank.rows, bank.num_neighbors, chunk_size)
  return maps, scores


@functools.partial(jax.jit, static_argnames=("model", "chunk_size"))
def score(
  model: Any,
  variables: Any,
  bank: MemoryBank,
  images: jax.Array,
  chunk_size: int = BANK_CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
  """Pixel anomaly maps (B, H, W) and image scores (B,) of `images` (B, H, W, 3).

  `images` ImageNet-normalised, any size the backbone accepts (not necessarily the
  shots' size). See `nearest`, `anomaly_map` and `image_score`.
  """
  return _score(model, variables, bank, images, chunk_size)


def make_scorer(model: Any, mesh, chunk_size: int = BANK_CHUNK_SIZE):
  """One compiled, data-parallel PatchCore scoring step over `mesh`.

  Returns `score(state, images) -> (maps, scores)` with `state = (variables, bank)`
  replicated (place it with `parallel.replicate`) and `images` (B, H, W, 3) split over the
  mesh's data axis (B a multiple of its size, e.g. via `parallel.shard_batch`); maps
  (B, H, W) and scores (B,) come back split the same way. Each image's result depends on
  that image and the bank only.
  """

  def step(state, images):
    variables, bank = state
    return _score(model, variables, bank, images, chunk_size)

  data, whole = parallel.batch_sharded(mesh), parallel.replicated(mesh)
  return jax.jit(step, in_shardings=(whole, data), out_shardings=(data, data))

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
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from maeday_jax import parallel
from maeday_jax.blur import gaussian_blur

LAYERS = ("layer2", "layer3")
DEFAULT_CORESET_RATIO = 0.1
# anomalib `KCenterGreedy` builds `SparseRandomProjection(eps=0.9)`.
PROJECTION_EPS = 0.9
# anomalib `PatchcoreModel(num_neighbors=9)`: support set of the image score.
NUM_NEIGHBORS = 9
# anomalib `AnomalyMapGenerator(sigma=4)`, kernel size `2 * int(4 * sigma + 0.5) + 1`.
BLUR_SIGMA = 4.0
BLUR_SIZE = 2 * int(4.0 * BLUR_SIGMA + 0.5) + 1  # 33 taps
# Rows per chunk: coreset distance updates (chunk x projected dim floats at a time) and
# nearest-neighbour search (patches x chunk floats at a time).
CORESET_CHUNK_SIZE = 16384
BANK_CHUNK_SIZE = 2048
# Shots run through the backbone at once when fitting a bank.
EMBED_BATCH = 16

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (no TF32), as PyTorch by default


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


# ------------------------------------------------------------------- random projection


def johnson_lindenstrauss_dim(num_samples: int, num_features: int, eps: float = PROJECTION_EPS):
  """Target dimension of the sparse random projection.

  `int(4 * log(n) / (eps**2 / 2 - eps**3 / 3))` (sklearn's and anomalib's
  `johnson_lindenstrauss_min_dim`; 164 for n = 784, eps = 0.9), capped at the number of
  features D when larger (never with 1536-D features) and at least 1.
  """
  denominator = eps**2 / 2 - eps**3 / 3
  dim = int(4 * np.log(num_samples) / denominator)
  return max(1, min(dim, num_features))


def sparse_random_projection(
  key: jax.Array, num_samples: int, num_features: int, eps: float = PROJECTION_EPS
) -> jax.Array:
  """The (k, D) float32 projection matrix of sklearn's / anomalib's `SparseRandomProjection`.

  k = `johnson_lindenstrauss_dim(num_samples, D, eps)`, density s = 1 / sqrt(D)
  (`density="auto"`). Every entry is independently

      +sqrt(1 / s) / sqrt(k)  with probability s / 2,
       0                      with probability 1 - s,
      -sqrt(1 / s) / sqrt(k)  with probability s / 2,

  the same distribution as anomalib's (each row's number of non-zeros is
  Binomial(D, s) at uniformly random columns, signs +-1 with probability 1/2). Features
  are `embeddings @ matrix.T`.
  """
  k = johnson_lindenstrauss_dim(num_samples, num_features, eps)
  density = 1.0 / math.sqrt(num_features)
  value = math.sqrt(1.0 / density) / math.sqrt(k)
  nonzero_key, sign_key = jax.random.split(key)
  nonzero = jax.random.bernoulli(nonzero_key, density, (k, num_features))
  positive = jax.random.bernoulli(sign_key, 0.5, (k, num_features))
  signed = jnp.where(positive, value, -value).astype(jnp.float32)
  return jnp.where(nonzero, signed, jnp.float32(0.0))


def coreset_start(key: jax.Array, num_rows: int) -> jax.Array:
  """The k-center start row: uniform over [0, num_rows) (anomalib: `torch.randint`)."""
  return jax.random.randint(key, (), 0, num_rows, dtype=jnp.int32)


def coreset_size(num_rows: int, ratio: float) -> int:
  """`int(num_rows * ratio)` rows (anomalib's `KCenterGreedy.coreset_size`); checks both."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"coreset_ratio must be in (0, 1], got {ratio}.")
  size = int(num_rows * ratio)
  if size < 1:
    raise ValueError(
      f"coreset_ratio={ratio} of {num_rows} embeddings keeps no row; use more shots or a "
      f"larger coreset_ratio (at least {1.0 / num_rows:.3g})."
    )
  return size


# ------------------------------------------------------------------ greedy k-center


def _local_layout(num_rows: int, num_devices: int, chunk_size: int) -> tuple[int, int]:
  """(rows per device, rows per chunk): every device holds a whole number of chunks."""
  per_device = -(-num_rows // num_devices)
  chunk = max(1, min(chunk_size, per_device))
  return -(-per_device // chunk) * chunk, chunk


def _greedy_shard(features, start, *, num_rows, size, chunk):
  """One device's part of the k-center loop (inside `shard_map`); see `kcenter_greedy`."""
  axis = parallel.DATA_AXIS
  local_rows = features.shape[0]
  offset = jax.lax.axis_index(axis) * local_rows
  rows = offset + jnp.arange(local_rows, dtype=jnp.int32)
  num_chunks = local_rows // chunk
  big = jnp.iinfo(jnp.int32).max

  def fetch(index):  # the global row `index`, from the device that holds it
    local = jnp.clip(index - offset, 0, local_rows - 1)
    owns = (index >= offset) & (index < offset + local_rows)
    return jax.lax.psum(jnp.where(owns, features[local], 0.0), axis)

  def select(i, carry):
    min_dist, center, chosen = carry

    def update(j, inner):
      min_dist, best_val, best_pos = inner
      block = jax.lax.dynamic_slice_in_dim(features, j * chunk, chunk)
      dist = jnp.sqrt(jnp.sum((block - center) ** 2, axis=-1))
      block_min = jnp.minimum(jax.lax.dynamic_slice_in_dim(min_dist, j * chunk, chunk), dist)
      min_dist = jax.lax.dynamic_update_slice_in_dim(min_dist, block_min, j * chunk, 0)
      pos = jnp.argmax(block_min).astype(jnp.int32)  # first maximum within the chunk
      val = block_min[pos]
      better = val > best_val  # strict: an earlier chunk wins ties
      return (
        min_dist,
        jnp.where(better, val, best_val),
        jnp.where(better, j * chunk + pos, best_pos),
      )

    init = (min_dist, jnp.float32(-jnp.inf), jnp.int32(0))
    min_dist, best_val, best_pos = jax.lax.fori_loop(0, num_chunks, update, init)
    # Global argmax, first occurrence: the largest value, then the smallest row index.
    top = jax.lax.pmax(best_val, axis)
    index = jax.lax.pmin(jnp.where(best_val == top, offset + best_pos, big), axis)
    return min_dist, fetch(index), chosen.at[i].set(index)

  # Padding rows start (and stay) at -1, below every real distance, so they are never chosen.
  min_dist = jnp.where(rows < num_rows, jnp.float32(jnp.inf), jnp.float32(-1.0))
  init = (min_dist, fetch(start), jnp.zeros((size,), jnp.int32))
  return jax.lax.fori_loop(0, size, select, init)[2]


@functools.partial(jax.jit, static_argnames=("num_rows", "size", "chunk", "mesh"))
def _kcenter_sharded(rows, matrix, start, *, num_rows, size, chunk, mesh):
  """Projects the (padded, split) `rows` with `matrix` (None: as they are), then selects."""
  features = rows if matrix is None else jnp.matmul(rows, matrix.T, precision=_HIGHEST)
  body = functools.partial(_greedy_shard, num_rows=num_rows, size=size, chunk=chunk)
  data = PartitionSpec(parallel.DATA_AXIS)
  return parallel.per_shard(body, mesh, (data, PartitionSpec()), PartitionSpec())(features, start)


def _select(rows, matrix, start, size, chunk_size, mesh) -> jax.Array:
  """Places `rows` (n, D) over `mesh` (default: every device) and runs the greedy loop."""
  mesh = parallel.data_mesh() if mesh is None else mesh
  num_rows = rows.shape[0]
  local_rows, chunk = _local_layout(num_rows, mesh.devices.size, chunk_size)
  rows = _place_rows(rows, local_rows * mesh.devices.size, mesh)
  matrix, start = parallel.replicate((matrix, jnp.asarray(start, jnp.int32)), mesh)
  return _kcenter_sharded(rows, matrix, start, num_rows=num_rows, size=size, chunk=chunk, mesh=mesh)


def _place_rows(x: np.ndarray | jax.Array, num_padded: int, mesh) -> jax.Array:
  """Zero-pads rows to `num_padded` and splits them over `mesh`'s data axis."""
  sharding = parallel.batch_sharded(mesh)
  if jax.process_count() == 1:
    x = jnp.asarray(x)
    x = jnp.pad(x, [(0, num_padded - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
    return jax.device_put(x, sharding)
  host = np.asarray(x)  # every process holds the same rows
  host = np.pad(host, [(0, num_padded - host.shape[0])] + [(0, 0)] * (host.ndim - 1))
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def kcenter_greedy(
  features: np.ndarray | jax.Array,
  start: int | jax.Array,
  size: int,
  *,
  chunk_size: int = CORESET_CHUNK_SIZE,
  mesh=None,
) -> jax.Array:
  """Greedy k-center selection on `features` (n, k): (size,) int32 row indices.

  anomalib's `KCenterGreedy.select_coreset_idxs`: the running minimum distance of every
  row to the selected set starts as its Euclidean distance to the `start` row; then, `size`
  times, the row with the largest minimum distance is selected (first index on ties) and
  the minimum distances are updated with the distances to it. As in anomalib the start
  row is not itself part of the result unless selected later. (torch's
  `pairwise_distance` adds 1e-6 to each coordinate difference; that shift is left out,
  so a row's distance to itself is exactly 0, as anomalib forces it to be.)

  Jitted `fori_loop` over selections; inside, the rows are split over `mesh`'s data axis
  (default: every device) and each device updates its rows `chunk_size` at a time
  (memory: the features, n distances and one chunk x k block; never n x n), then a
  max/min all-reduce picks the next row.
  """
  return _select(jnp.asarray(features, jnp.float32), None, start, size, chunk_size, mesh)


def coreset_indices(
  embeddings: np.ndarray | jax.Array,
  key: jax.Array,
  ratio: float = DEFAULT_CORESET_RATIO,
  *,
  chunk_size: int = CORESET_CHUNK_SIZE,
  mesh=None,
  eps: float = PROJECTION_EPS,
) -> jax.Array:
  """Bank rows of `embeddings` (n, D): (floor(n * ratio),) int32 indices, in selection order.

  `projection_key, start_key = jax.random.split(key)`; the rows are projected with
  `sparse_random_projection(projection_key, n, D, eps)` and selected by `kcenter_greedy`
  from `coreset_start(start_key, n)`. `ratio=1.0` keeps every row in its original order
  (`arange(n)`, no randomness), so a bank can be matched against external references.
  """
  num_rows, num_features = embeddings.shape
  size = coreset_size(num_rows, ratio)
  if ratio == 1.0:
    return jnp.arange(num_rows, dtype=jnp.int32)
  projection_key, start_key = jax.random.split(key)
  matrix = sparse_random_projection(projection_key, num_rows, num_features, eps)
  start = coreset_start(start_key, num_rows)
  # Projected on the devices, each its own rows: (n, k) features, never gathered.
  rows = jnp.asarray(embeddings, jnp.float32)
  return _select(rows, matrix, start, size, chunk_size, mesh)


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


def _squared_distances(queries: jax.Array, rows: jax.Array) -> jax.Array:
  """|q|^2 - 2 q.r + |r|^2, clamped at 0 (anomalib's `euclidean_dist` before its sqrt)."""
  q_sq = jnp.sum(queries**2, axis=-1, keepdims=True)
  r_sq = jnp.sum(rows**2, axis=-1)
  cross = jnp.matmul(queries, rows.T, precision=_HIGHEST)
  return jnp.maximum(q_sq - 2.0 * cross + r_sq, 0.0)


def _k_nearest(queries, bank, k, chunk_size, first=None):
  """The k smallest squared distances (Q, k) of `queries` (Q, D) to `bank` rows, and their
  indices, by a scan over bank chunks (a Q x chunk block at a time). Ties keep the lower
  index. `first` (Q,) forces that bank row to rank first for each query.
  """
  num_rows, dim = bank.shape
  chunk = max(1, min(chunk_size, num_rows))
  num_chunks = -(-num_rows // chunk)
  padded = jnp.pad(bank, ((0, num_chunks * chunk - num_rows), (0, 0)))
  starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
  num_queries = queries.shape[0]

  def body(carry, xs):
    best_d, best_i = carry
    block, begin = xs
    cols = begin + jnp.arange(chunk, dtype=jnp.int32)
    d2 = _squared_distances(queries, block)
    d2 = jnp.where(cols[None, :] < num_rows, d2, jnp.inf)
    if first is not None:
      d2 = jnp.where(cols[None, :] == first[:, None], -1.0, d2)
    if k == 1:
      pos = jnp.argmin(d2, axis=-1)
      val = jnp.take_along_axis(d2, pos[:, None], axis=-1)
      better = val < best_d  # strict: an earlier chunk wins ties
      return (jnp.where(better, val, best_d), jnp.where(better, cols[pos][:, None], best_i)), None
    all_d = jnp.concatenate([best_d, d2], axis=-1)
    all_i = jnp.concatenate([best_i, jnp.broadcast_to(cols, (num_queries, chunk))], axis=-1)
    neg, pos = jax.lax.top_k(-all_d, k)  # stable: lower positions (earlier rows) first
    return (-neg, jnp.take_along_axis(all_i, pos, axis=-1)), None

  init = (jnp.full((num_queries, k), jnp.inf, jnp.float32), jnp.zeros((num_queries, k), jnp.int32))
  xs = (padded.reshape(num_chunks, chunk, dim), starts)
  (best_d, best_i), _ = jax.lax.scan(body, init, xs)
  return best_d, best_i


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def nearest(
  patches: jax.Array, bank: jax.Array, chunk_size: int = BANK_CHUNK_SIZE
) -> tuple[jax.Array, jax.Array]:
  """Euclidean distance (P,) of each patch (P, D) to its nearest `bank` row (M, D), and
  that row's index (P,) (first on ties).

  anomalib's `nearest_neighbors(n_neighbors=1)` with `euclidean_dist` (the expanded
  |p|^2 - 2 p.b + |b|^2, clamped at 0, then sqrt), computed over the bank `chunk_size`
  rows at a time with a running min and argmin: at most a P x chunk block exists.
  """
  d2, index = _k_nearest(patches.astype(jnp.float32), bank.astype(jnp.float32), 1, chunk_size)
  return jnp.sqrt(d2[:, 0]), index[:, 0]


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
  _, support = _k_nearest(bank[m_star], bank, k, chunk_size, first=m_star)  # (B, k)
  d2 = jax.vmap(lambda p, rows: _squared_distances(p[None], rows)[0])(test_patch, bank[support])
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

"""Greedy k-center coreset selection (anomalib's `KCenterGreedy`), sharded over devices.

A coreset keeps `floor(n * ratio)` of n embedding rows that cover all of them: rows are
projected to a few hundred dimensions with a sparse random projection
(`sparse_random_projection`, sklearn's `SparseRandomProjection`), then greedily the row
farthest from every row selected so far is added (`kcenter_greedy`). `coreset_indices`
does both. PatchCore builds its memory bank this way; any kNN detector that needs a
smaller bank than all its reference patches can too.

Memory stays bounded: the loop computes one center's distances to the rows in chunks of
`chunk_size` rows (never an n x n matrix). The rows are split over a 1-D device mesh
(`shard_map`); each selection is a max/min all-reduce across devices, so 1 and 8 devices
select the same rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from maeday_jax import parallel

# anomalib's default `coreset_sampling_ratio`.
DEFAULT_CORESET_RATIO = 0.1
# anomalib `KCenterGreedy` builds `SparseRandomProjection(eps=0.9)`.
PROJECTION_EPS = 0.9
# Rows per chunk of the distance updates (chunk x projected dim floats at a time).
CORESET_CHUNK_SIZE = 16384

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (no TF32), as PyTorch by default


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

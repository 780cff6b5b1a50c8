"""Exact nearest-neighbour search of query rows in a bank of rows, chunked over the bank.

Distances are anomalib's `euclidean_dist`: the expanded |q|^2 - 2 q.r + |r|^2, clamped at 0
(`squared_distances`). `k_nearest` scans the bank `chunk_size` rows at a time with a
running top-k, so at most a queries x chunk block of distances exists, however large the
bank; `nearest` is the k = 1 case with the square root taken. PatchCore scores with them;
any patch kNN detector can.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Bank rows per chunk (queries x chunk floats at a time).
BANK_CHUNK_SIZE = 2048

_HIGHEST = jax.lax.Precision.HIGHEST  # float32 products (no TF32), as PyTorch by default


def l2_normalize(x: jax.Array) -> jax.Array:
  """`x` L2-normalised along its last axis (a zero row stays zero): rows whose squared
  distances are 2 - 2 cos, for the cosine kNN detectors."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def squared_distances(queries: jax.Array, rows: jax.Array) -> jax.Array:
  """|q|^2 - 2 q.r + |r|^2, clamped at 0 (anomalib's `euclidean_dist` before its sqrt)."""
  q_sq = jnp.sum(queries**2, axis=-1, keepdims=True)
  r_sq = jnp.sum(rows**2, axis=-1)
  cross = jnp.matmul(queries, rows.T, precision=_HIGHEST)
  return jnp.maximum(q_sq - 2.0 * cross + r_sq, 0.0)


def k_nearest(
  queries: jax.Array,
  bank: jax.Array,
  k: int,
  chunk_size: int = BANK_CHUNK_SIZE,
  first: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The k smallest squared distances (Q, k) of `queries` (Q, D) to `bank` rows (M, D), and
  their int32 indices (Q, k), nearest first, by a scan over bank chunks (a Q x chunk block
  at a time). Ties keep the lower index. `first` (Q,) forces that bank row to rank first
  for each query (its distance then reads -1).

  Not jitted itself (`k` and `chunk_size` are Python ints): call it inside `jax.jit`. The
  caller chooses the dtype (float32 for anomalib's numbers); k <= M.
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
    d2 = squared_distances(queries, block)
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
  d2, index = k_nearest(patches.astype(jnp.float32), bank.astype(jnp.float32), 1, chunk_size)
  return jnp.sqrt(d2[:, 0]), index[:, 0]

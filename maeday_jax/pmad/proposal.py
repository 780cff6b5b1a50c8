"""PMAD's prototype-guided proposal masking at inference.

Each patch feature minus its nearest normal prototype (`residuals`) is scored by the flow
fitted on normal residuals; the patches the flow finds least likely are the proposals
(`abnormality`, `proposal_mask`) that the reconstruction network then masks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from maeday_jax import nearest_neighbors


def residuals(
  features: jax.Array,
  prototypes: jax.Array,
  chunk_size: int = nearest_neighbors.BANK_CHUNK_SIZE,
) -> jax.Array:
  """features (B, N, D) minus each one's nearest prototype (P, D) in Euclidean distance
  (first prototype on ties), float32 (B, N, D); the search is
  `nearest_neighbors.nearest` over `chunk_size` prototypes at a time."""
  b, n, d = features.shape
  if prototypes.ndim != 2 or prototypes.shape[1] != d:
    raise ValueError(
      f"prototypes must be (P, {d}) for features {features.shape}, got {prototypes.shape}."
    )
  flat = features.reshape(b * n, d).astype(jnp.float32)
  prototypes = prototypes.astype(jnp.float32)
  _, index = nearest_neighbors.nearest(flat, prototypes, chunk_size)
  return (flat - prototypes[index]).reshape(b, n, d)


def abnormality(log_likelihoods: jax.Array) -> jax.Array:
  """The method's abnormality (B, N) of each patch from its log-likelihood (B, N),
  scaled per image.

  PMAD's a_i = max_j p_j - p_i over the patches j of the same image, with p = exp(ll).
  Log-likelihoods of hundreds of dimensions are in the hundreds or thousands of nats, so
  exp(ll) under- or overflows float32 (exp(-800) - exp(-1200) reads 0 - 0). Dividing by
  the per-image factor exp(max_j ll_j) gives the stable a_i = 1 - exp(ll_i - max_j ll_j)
  = -expm1(ll_i - max_j ll_j), in [0, 1]: 0 for the likeliest patch, near 1 for patches
  far less likely. The ORDER of the patches inside an image is the method's; values are
  not comparable across images (each image has its own dropped factor).
  """
  ll = log_likelihoods.astype(jnp.float32)
  return -jnp.expm1(ll - jnp.max(ll, axis=-1, keepdims=True))


def num_proposals(num_patches: int, ratio: float) -> int:
  """round(ratio * num_patches) (halves up), at least 1; `ratio` must lie in (0, 1)."""
  if not 0.0 < ratio < 1.0:
    raise ValueError(
      f"Proposal ratio {ratio} must lie strictly between 0 and 1 (the share of the "
      "patches to mask, e.g. 0.25)."
    )
  return min(num_patches, max(1, math.floor(ratio * num_patches + 0.5)))


@functools.partial(jax.jit, static_argnames=("ratio",))
def proposal_mask(log_likelihoods: jax.Array, ratio: float) -> jax.Array:
  """Bool (B, N): per image, the `num_proposals(N, ratio)` most abnormal patches.

  Most abnormal = lowest log-likelihood (the same order as `abnormality`, without the
  rounding that can make its values equal); equal log-likelihoods: the lower patch index
  first.
  """
  _, n = log_likelihoods.shape
  count = num_proposals(n, ratio)
  _, index = jax.lax.top_k(-log_likelihoods.astype(jnp.float32), count)
  return jnp.any(index[..., None] == jnp.arange(n), axis=-2)

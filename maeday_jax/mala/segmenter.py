"""Scoring with the MALA segmenter (equation 7 of the paper).

The network (`Segmenter`: the MAE + Token Balance Module, and its parameter helpers) is
`maeday_jax.models.segmenter`, re-exported here. The pixel map is channel 0's
probability; the image score is the maximum of the map average-pooled with a k x k
window.

    segmenter = Segmenter(mae)
    params = segmenter_params(segmenter, mae_params, key)     # {"mae": ..., TBM layers}
    maps = defect_probability(segmenter.apply({"params": params}, images))
    scores = pooled_max(maps, pool_size=16)                   # the `mala` detector's score
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maeday_jax.models.segmenter import (
  ENCODER_PARAMS,
  Segmenter,
  is_frozen,
  merge,
  segmenter_params,
  split_frozen,
)

__all__ = [
  "DEFAULT_POOL_SIZE",
  "ENCODER_PARAMS",
  "Segmenter",
  "defect_probability",
  "is_frozen",
  "merge",
  "pooled_max",
  "segmenter_params",
  "split_frozen",
]

DEFAULT_POOL_SIZE = 16


def defect_probability(logits: jax.Array) -> jax.Array:
  """Channel 0 of the softmax over the two channels: (B, H, W, 2) -> (B, H, W)."""
  return jax.nn.softmax(logits, axis=-1)[..., 0]


def pooled_max(maps: jax.Array, pool_size: int = DEFAULT_POOL_SIZE) -> jax.Array:
  """Image score (equation 7): max of the map average-pooled with a k x k window.

  (B, H, W) -> (B,); stride 1, no padding (every window lies inside the image), so a
  single hot pixel scores 1/k^2 of its value and only a defect of about k x k pixels
  reaches its full probability.
  """
  k = min(pool_size, maps.shape[-2], maps.shape[-1])
  pooled = jax.lax.reduce_window(maps, 0.0, jax.lax.add, (1, k, k), (1, 1, 1), "VALID")
  return jnp.max(pooled, axis=(-2, -1)) / (k * k)

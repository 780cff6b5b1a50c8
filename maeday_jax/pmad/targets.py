"""What PMAD's reconstructor predicts for a masked patch, its loss, and the per-patch
anomaly term the score multiplies by the patch's abnormality.

  dvae      the DALL-E tokenizer's code of the patch (8192 codes; the tokenizer sees the
            image at 8 px per grid cell, e.g. 112 px for the 14 x 14 grid of a 224 px
            ViT with 16 px patches): cross-entropy; score = entropy of the prediction
  codebook  the index of the patch feature's nearest row in a k-means codebook of the
            normal images' features (a tokenizer learned here): the same loss and score
  features  the feature network's patch feature, normalised per patch (zero mean, unit
            variance over channels): mean squared error; score = that error
  pixels    the patch's pixels, normalised per patch as above: the same
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax import imagenet
from maeday_jax.models import patches
from maeday_jax.settings.pmad import CATEGORICAL_TARGETS

DVAE_CELL = 8  # The dVAE's encoder halves the image three times.


def is_categorical(kind: str) -> bool:
  """Whether `kind` is predicted as a distribution over codes."""
  return kind in CATEGORICAL_TARGETS


def normalize_per_patch(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """(..., D) rows at zero mean and unit variance."""
  mean = x.mean(axis=-1, keepdims=True)
  var = x.var(axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps)


def nearest_codes(features: jax.Array, codebook: jax.Array) -> jax.Array:
  """(B, N) int32 index of each feature's nearest codebook row (Euclidean)."""
  from maeday_jax import nearest_neighbors

  batch, count, dim = features.shape
  _, index = nearest_neighbors.nearest(features.reshape(-1, dim), codebook)
  return index.reshape(batch, count).astype(jnp.int32)


def fit_codebook(features: np.ndarray, size: int, seed: int, max_rows: int = 50_000) -> np.ndarray:
  """A k-means codebook (size, C) of feature rows (M, C) (scikit-learn's k-means++ and
  Lloyd on at most `max_rows` random rows); fewer rows than codes: every row a code."""
  from sklearn.cluster import KMeans

  rows = np.asarray(features, np.float32)
  rng = np.random.default_rng(seed)
  if len(rows) > max_rows:
    rows = rows[rng.choice(len(rows), max_rows, replace=False)]
  size = min(int(size), len(np.unique(rows, axis=0)))
  kmeans = KMeans(n_clusters=size, n_init=1, max_iter=100, random_state=seed).fit(rows)
  return kmeans.cluster_centers_.astype(np.float32)


def dvae_inputs(images: jax.Array, grid: int) -> jax.Array:
  """ImageNet-normalised images -> the tokenizer's input: [0, 1] pixels at `grid` x 8 px."""
  pixels = jnp.clip(imagenet.denormalize(images) / 255.0, 0.0, 1.0)
  size = grid * DVAE_CELL
  if pixels.shape[1] != size:
    batch = pixels.shape[0]
    pixels = jax.image.resize(pixels, (batch, size, size, 3), "linear", antialias=True)
  return pixels


def regression_values(kind: str, images: jax.Array, features, patch_size: int) -> jax.Array:
  """(B, N, D) regression targets: normalised features or normalised patch pixels."""
  if kind == "features":
    return normalize_per_patch(features)
  return normalize_per_patch(patches.patchify(images, patch_size))


def patch_losses(kind: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """(B, N) per-patch loss: cross-entropy against codes (B, N), or the mean squared error
  against values (B, N, D)."""
  if is_categorical(kind):
    logp = jax.nn.log_softmax(outputs, axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.mean(jnp.square(outputs - targets), axis=-1)


def masked_mean(values: jax.Array, masked: jax.Array) -> jax.Array:
  """Mean of (B, N) `values` over the masked patches."""
  weights = masked.astype(values.dtype)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def entropy(logits: jax.Array) -> jax.Array:
  """(B, N) entropy -sum p log p (nats) of the predicted code distributions."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

"""MuSc-style zero-shot detection (ICLR 2024): the unlabeled images of a group
score each other.

Transductive: an image's score depends on the other images it is scored with (a group:
the bulk job's `--config.group_size`, the evaluate job's batch), which must hold several
images of one product; most of them should be normal. Per group, on device:

1. Patch tokens of several DINOv2 layers (`musc.layers`), each token layer-normalised
   (no affine), then averaged over its r x r neighbourhood for each aggregation degree r
   in `musc.degrees` (zero padding counted, as an average pool with count_include_pad).
2. Mutual scoring: for every patch of image i and every other valid image j of the
   group, the Euclidean distance to its nearest patch of j; the patch's score is the mean
   of the smallest `musc.fraction` of those distances (at least one); averaged over the
   layers and degrees. Computed as one (B, P) x (P, C) product per reference image j
   (`lax.map` over j), never as a Python loop over pairs; the images are split over the
   devices and XLA shards the products.
3. The map: patch scores upsampled to the input (nearest) and Gaussian-smoothed (sigma
   4); the image score: the map's maximum.
4. Re-scoring over the image-level neighbourhood graph (RsCIN): the group's image scores,
   min-max normalised, are averaged over each image's k most similar images (cosine
   similarity of the last layer's class tokens, the image itself included, weighted by
   the similarity) for each k in `musc.rescore_k`, and those averages are averaged.

Memory: one step holds B x P x P distances (B images of P patches): 8 images of
1024 patches (448 px) are 32 MiB; the job refuses a group whose step would not fit.
"""

from __future__ import annotations

import logging

import ml_collections

from maeday_jax.config_errors import require
from maeday_jax.detectors.anomalydino import AnomalyDino, require_patch_multiple

log = logging.getLogger("maeday_jax")


def musc_section() -> ml_collections.ConfigDict:
  """MuSc's settings.

  Fields:
    backbone, checkpoint, image_size: the DINOv2 and its input, as for `anomalydino`.
    layers: the blocks whose patch tokens are compared (0-based; ViT-S/B: 2, 5, 8, 11).
    degrees: the neighbourhood sizes r of the aggregation (odd).
    fraction: the share of the other images whose nearest-patch distances are averaged.
    rescore_k: the neighbourhood sizes of the image-level re-scoring (() = off).
  """
  return ml_collections.ConfigDict(
    {
      "backbone": "dinov2_vits14",
      "checkpoint": "",
      "image_size": 448,
      "layers": (2, 5, 8, 11),
      "degrees": (1, 3, 5),
      "fraction": 0.3,
      "rescore_k": (2, 3),
    }
  )


def layer_norm(x):
  """LayerNorm over the last axis without scale or offset (eps 1e-5, PyTorch's default)."""
  import jax.numpy as jnp

  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + 1e-5)


def aggregate(tokens, degree: int):
  """(B, h, w, C) tokens averaged over each r x r neighbourhood (zeros outside count)."""
  import jax

  if degree == 1:
    return tokens
  pad = (degree - 1) // 2
  summed = jax.lax.reduce_window(
    tokens,
    0.0,
    jax.lax.add,
    (1, degree, degree, 1),
    (1, 1, 1, 1),
    ((0, 0), (pad, pad), (pad, pad), (0, 0)),
  )
  return summed / (degree * degree)


def mutual_scores(features, valid, fraction: float):
  """(B, P) scores of every patch of every image against the other valid images.

  features: (B, P, C); valid: (B,) bool. For image i, patch p and image j != i: the
  distance to j's nearest patch; the mean of the smallest max(1, int(fraction * (n - 1)))
  of them over j (n valid images).
  """
  import jax
  import jax.numpy as jnp

  batch = features.shape[0]
  squared = jnp.sum(features**2, axis=-1)  # (B, P)

  def against(j):
    reference = features[j]  # (P, C)
    cross = jnp.einsum("bpc,qc->bpq", features, reference, precision=jax.lax.Precision.HIGHEST)
    d2 = squared[:, :, None] - 2.0 * cross + jnp.sum(reference**2, axis=-1)[None, None, :]
    return jnp.sqrt(jnp.maximum(jnp.min(d2, axis=-1), 0.0))  # (B, P)

  nearest = jax.lax.map(against, jnp.arange(batch))  # (J, B, P)
  usable = valid[:, None] & ~jnp.eye(batch, dtype=bool)  # (J, B): j valid and j != i
  nearest = jnp.where(usable[:, :, None], nearest, jnp.inf)
  others = jnp.maximum(valid.sum() - 1, 1)
  count = jnp.maximum((fraction * others).astype(jnp.int32), 1)
  ordered = jnp.sort(nearest, axis=0)  # Ascending over j; the excluded (inf) last.
  keep = (jnp.arange(batch) < count)[:, None, None]
  return jnp.sum(jnp.where(keep, ordered, 0.0), axis=0) / count


def rescore(scores, class_tokens, valid, ks: tuple[int, ...]):
  """The image scores averaged over their image-level neighbourhoods (RsCIN)."""
  import jax.numpy as jnp

  from maeday_jax import nearest_neighbors

  if not ks:
    return scores
  low = jnp.min(jnp.where(valid, scores, jnp.inf))
  high = jnp.max(jnp.where(valid, scores, -jnp.inf))
  normalised = (scores - low) / jnp.maximum(high - low, 1e-12)
  unit = nearest_neighbors.l2_normalize(class_tokens)
  similarity = jnp.where(valid[None, :], unit @ unit.T, -jnp.inf)
  ranks = jnp.argsort(jnp.argsort(-similarity, axis=1), axis=1)  # 0 = most similar
  results = []
  for k in ks:
    weights = jnp.where(ranks < k, similarity, 0.0)
    weights = jnp.where(valid[None, :], weights, 0.0)
    weights = weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    results.append(weights @ normalised)
  return jnp.mean(jnp.stack(results), axis=0)


class Musc(AnomalyDino):
  """MuSc-style mutual scoring of the unlabeled images of a group (zero-shot)."""

  method = "musc"
  summary = "MuSc: zero-shot mutual scoring of the unlabeled images of a group"
  needs_shots = False
  transductive = True
  SECTIONS = {"musc": musc_section}

  @classmethod
  def validate(cls, config) -> None:
    section = config.musc
    require_patch_multiple(section.image_size, "musc.image_size")
    require(
      bool(section.degrees) and all(int(r) >= 1 and int(r) % 2 for r in section.degrees),
      "musc.degrees",
      f"{list(section.degrees)}: give odd neighbourhood sizes, e.g. 1,3,5.",
    )
    require(0.0 < section.fraction <= 1.0, "musc.fraction", "must be in (0, 1].")
    require(bool(section.layers), "musc.layers", "give at least one layer.")
    require(
      config.get("group_size") != 1,
      "group_size",
      "musc scores each image against the OTHER images of its group: use at least 2 "
      "(e.g. 200 images of one product line).",
    )

  @property
  def _section(self):
    return self.settings.musc

  def fit(self, normals, key) -> None:
    del normals, key  # Zero-shot: the group itself is the reference.
    if self._net is None:
      self.build()
    depth = self._net.num_layers
    bad = [i for i in self._section.layers if not 0 <= int(i) < depth]
    require(not bad, "musc.layers", f"{bad}: this DINOv2 has layers 0 to {depth - 1}.")

  def step_signature(self):
    s = self._section
    return (
      "musc",
      self._net.model,
      tuple(s.layers),
      tuple(s.degrees),
      float(s.fraction),
      tuple(s.rescore_k),
    )

  def score_function(self, mesh, local_batch: int):
    import dataclasses

    import jax.numpy as jnp

    from maeday_jax import memory_budget, patchcore

    section = self._section
    patches = (self.input_size // self._net.model.patch_size) ** 2
    # One step of the mutual scoring holds (local images x P x P) float32 distances.
    memory_budget.require_fits(
      f"a group of {local_batch} images per device at {self.input_size} px",
      4 * local_batch * patches * patches,
      "group_size",
      mesh.devices.flat[0],
    )
    layers = tuple(int(i) for i in section.layers)
    degrees = tuple(int(r) for r in section.degrees)
    fraction, ks = float(section.fraction), tuple(int(k) for k in section.rescore_k)

    def score(state, images, ids, key, valid):
      del ids, key
      net = dataclasses.replace(self._net, params=state["dinov2"])
      tokens = net.patch_tokens(images, layers=layers)
      total = 0.0
      for layer in layers:
        normed = layer_norm(tokens[layer])
        batch, rows, cols, dim = normed.shape
        for degree in degrees:
          features = aggregate(normed, degree).reshape(batch, rows * cols, dim)
          total = total + mutual_scores(features, valid, fraction)
      patch_scores = (total / (len(layers) * len(degrees))).reshape(batch, rows, cols)
      maps = patchcore.anomaly_map(patch_scores, tuple(images.shape[1:3]))
      scores = jnp.max(maps, axis=(1, 2))
      return maps, rescore(scores, net.class_token(images), valid, ks)

    return score

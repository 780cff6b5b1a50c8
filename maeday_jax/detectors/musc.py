"""MuSc-style zero-shot detection (ICLR 2024): the unlabeled images of a group
score each other.

Transductive: an image's score depends on the other images it is scored with (a group:
the bulk job's `--config.group_size`, the evaluate job's batch), which must hold several
images of one product; most of them should be normal. Per group, on device:

1. Patch tokens of several layers (`musc.layers`) of the backbone (`musc.backbone`:
   DINOv2 by default, or CLIP's image tower, as in the paper's ViT-L/14-336; CLIP is fed
   its own pixel normalisation), each token layer-normalised (no affine), then averaged
   over its r x r neighbourhood for each aggregation degree r in `musc.degrees` (zero
   padding counted, as an average pool with count_include_pad).
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
   similarity of the images' global features, the image itself included, weighted by
   the similarity: DINOv2's last class token through its final norm, CLIP's image
   embedding) for each k in `musc.rescore_k`, and those averages are averaged.

Memory: one step holds B x P x P distances (B images of P patches): 8 images of
1024 patches (448 px) are 32 MiB; the job refuses a group whose step would not fit.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from maeday_jax.config_errors import require
from maeday_jax.detectors import weights_ref
from maeday_jax.detectors.anomalydino import AnomalyDino, patch_multiple, require_patch_multiple

log = logging.getLogger("maeday_jax")
# The blocks whose tokens MuSc compares: its DINOv2 default (ViT-S/B, 12 blocks), and the
# paper's for CLIP's image towers (the outputs of blocks 6, 12, 18, 24 of ViT-L/14).
DINOV2_LAYERS = (2, 5, 8, 11)
PAPER_CLIP_LAYERS = {
  "clip_vit_l14": (5, 11, 17, 23),
  "clip_vit_l14_336": (5, 11, 17, 23),
  "clip_vit_b16": (2, 5, 8, 11),
}


def musc_section() -> ml_collections.ConfigDict:
  """MuSc's settings.

  Fields:
    backbone: the `models.load` name: a DINOv2 (dinov2_vits14 ... dinov2_vitg14_reg;
      dinov2_test for smoke tests) or a CLIP (clip_vit_b16, clip_vit_l14,
      clip_vit_l14_336, the paper's; clip_test for smoke tests).
    checkpoint: its weights: '' (the backbone's public checkpoint), a file, a Hugging Face
      folder, or 'random'.
    image_size: the square input, rounded to a multiple of the backbone's patch (14; 16
      for clip_vit_b16); 448 here, 518 in the paper with CLIP ViT-L/14-336.
    layers: the blocks whose patch tokens are compared (0-based; DINOv2 ViT-S/B: 2, 5, 8,
      11; CLIP ViT-L/14(-336): 5, 11, 17, 23, the paper's outputs of blocks 6, 12, 18, 24;
      CLIP ViT-B/16: 2, 5, 8, 11).
    degrees: the neighbourhood sizes r of the aggregation (odd).
    fraction: the share of the other images whose nearest-patch distances are averaged.
    rescore_k: the neighbourhood sizes of the image-level re-scoring (() = off).
  """
  return ml_collections.ConfigDict(
    {
      "backbone": "dinov2_vits14",
      "checkpoint": "",
      "image_size": 448,
      "layers": DINOV2_LAYERS,
      "degrees": (1, 3, 5),
      "fraction": 0.3,
      "rescore_k": (2, 3),
    }
  )


# The backbone families, by their `models.load` prefix (also the state key of the
# backbone's parameters and the kind of its public weights), as messages name them.
_FAMILIES = {"dinov2": "DINOv2", "clip": "CLIP"}


def backbone_family(name: str) -> tuple[str, int]:
  """(family: 'dinov2' or 'clip', patch size in px) of a `musc.backbone` name.

  Raises:
    ConfigError: another name, naming `musc.backbone` and the choices.
  """
  from maeday_jax.models import clip, dinov2

  known = {
    **{f"dinov2_{v}": ("dinov2", spec["patch_size"]) for v, spec in dinov2.VARIANTS.items()},
    **{f"clip_{v}": ("clip", spec["patch_size"]) for v, spec in clip.VARIANTS.items()},
  }
  name = str(name)
  require(
    name in known,
    "musc.backbone",
    f"{name!r} is not a backbone MuSc runs on: use a DINOv2 "
    f"({', '.join(n for n in known if n.startswith('dinov2_'))}) or a CLIP "
    f"({', '.join(n for n in known if n.startswith('clip_'))}).",
  )
  return known[name]


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
    family, patch = backbone_family(section.backbone)
    network = f"{_FAMILIES[family]} {section.backbone}" if family == "clip" else "DINOv2"
    require_patch_multiple(section.image_size, "musc.image_size", patch, network)
    require(
      bool(section.degrees) and all(int(r) >= 1 and int(r) % 2 for r in section.degrees),
      "musc.degrees",
      f"{list(section.degrees)}: give odd neighbourhood sizes, e.g. 1,3,5.",
    )
    require(0.0 < section.fraction <= 1.0, "musc.fraction", "must be in (0, 1].")
    require(bool(section.layers), "musc.layers", "give at least one layer.")
    paper_layers = PAPER_CLIP_LAYERS.get(section.backbone)
    chosen = tuple(int(i) for i in section.layers)
    if paper_layers and paper_layers != DINOV2_LAYERS and chosen == DINOV2_LAYERS:
      log.warning(
        "musc on %s with the DINOv2 default layers %s; the method uses %s for this CLIP: "
        "set --config.musc.layers=%s.",
        section.backbone,
        ",".join(map(str, DINOV2_LAYERS)),
        ",".join(map(str, paper_layers)),
        ",".join(map(str, paper_layers)),
      )
    require(
      config.get("group_size") != 1,
      "group_size",
      "musc scores each image against the OTHER images of its group: use at least 2 "
      "(e.g. 200 images of one product line).",
    )

  @property
  def _section(self):
    return self.settings.musc

  @property
  def _family(self) -> str:
    """'dinov2' or 'clip': also the state key of the backbone's parameters and the kind
    of its public weights."""
    return backbone_family(self._section.backbone)[0]

  @property
  def input_size(self) -> int:
    patch = backbone_family(self._section.backbone)[1]
    return patch_multiple(self._section.image_size, patch)  # `validate` warns when it rounds.

  def build(self) -> None:
    """Loads the backbone (the public checkpoint, a file, or random weights)."""
    import jax

    from maeday_jax import models

    section, family = self._section, self._family
    checkpoint = section.checkpoint or section.backbone
    if checkpoint == "random":
      log.warning(
        "%s with a RANDOM %s: its figures are meaningless.", self.method, _FAMILIES[family]
      )
    self._net = models.load(section.backbone, checkpoint, key=jax.random.key(self.settings.seed))
    self._weights = weights_ref.PublicWeights.of(checkpoint, family)
    self.state = {family: self._net.params}

  def fit(self, normals, key) -> None:
    del normals, key  # Zero-shot: the group itself is the reference.
    if self._net is None:
      self.build()
    depth = self._net.num_layers
    bad = [i for i in self._section.layers if not 0 <= int(i) < depth]
    require(
      not bad,
      "musc.layers",
      f"{bad}: this {_FAMILIES[self._family]} has layers 0 to {depth - 1}.",
    )

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
    family = self._family

    def score(state, images, ids, key, valid):
      del ids, key
      net = dataclasses.replace(self._net, params=state[family])
      tokens, global_features = backbone_features(net, family, images, layers)
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
      return maps, rescore(scores, global_features, valid, ks)

    return score

  def saved_state(self) -> Any:
    return weights_ref.without_public(self.state, self._weights, self._family)

  def record(self) -> dict:
    from maeday_jax.models import clip, dinov2

    family = self._family
    architecture = (dinov2 if family == "dinov2" else clip).architecture(self._net.model)
    return weights_ref.network_record(self._weights, architecture)

  def restore(self, record: dict, state: Any) -> None:
    from maeday_jax.models import clip, dinov2, features

    family = self._family

    def wrap(architecture, params):
      if family == "dinov2":
        return features.DinoV2Features(dinov2.DinoV2(**architecture), params)
      return features.ClipFeatures(clip.CLIP(**architecture), params)

    self._weights, self._net, self.state = weights_ref.restore_network(
      record, state, family, self._section.backbone, wrap
    )


def backbone_features(net, family: str, images, layers: tuple[int, ...]):
  """({layer: (B, h, w, C)} raw block outputs, (B, D) global features) of ImageNet-
  normalised images: DINOv2's last class token through its final norm, or CLIP's image
  embedding (ln_post(class token) @ proj) with CLIP's own pixel normalisation, in one
  pass through the image tower."""
  if family == "dinov2":
    return net.patch_tokens(images, layers=layers), net.class_token(images)
  from maeday_jax.detectors.clip_zero_shot import imagenet_to_clip

  images = imagenet_to_clip(images)
  params = {"params": net.params}
  blocks = net.model.apply(params, images, net.num_layers - 1, method="image_blocks")
  patch = net.model.patch_size
  rows, cols = images.shape[1] // patch, images.shape[2] // patch
  tokens = {i: blocks[i][:, 1:].reshape(images.shape[0], rows, cols, -1) for i in layers}
  embedding = net.model.apply(params, blocks[-1][:, :1], method="image_project")[:, 0]
  return tokens, embedding

"""AnomalyDINO (WACV 2025): training-free few-shot detection with DINOv2 patches.

The memory bank holds the L2-normalised last-layer patch tokens (through DINOv2's final
norm) of the normal shots, each also rotated by `rotations` degrees (multiples of 90:
exact, no interpolation); a test patch's anomaly is its cosine distance to the nearest
bank patch (an exact search on device, in chunks of the bank: `nearest_neighbors`).
With `masking`, patches outside the zero-shot foreground (`maeday_jax.foreground`: the
first principal component of the tokens) are left out of the bank and score 0, as the
method does for object categories. Map: the patch distances upsampled (nearest) to the
input and Gaussian-smoothed (sigma 4, PatchCore's `anomaly_map`); image score: the mean
of the top 1 % patch distances.

The artifact stores the bank, and DINOv2's weights unless they are the public checkpoint
(then referenced by name and SHA-256).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import ml_collections

from maeday_jax.config_errors import require
from maeday_jax.detectors import weights_ref
from maeday_jax.detectors.base import Detector

log = logging.getLogger("maeday_jax")
TOP_FRACTION = 0.01


def anomalydino_section() -> ml_collections.ConfigDict:
  """AnomalyDINO's settings.

  Fields:
    backbone: the DINOv2 (`models.load` names: dinov2_vits14 ... dinov2_vitg14_reg;
      dinov2_test for smoke tests).
    checkpoint: its weights: '' (the backbone's public checkpoint), a file, a Hugging Face
      folder, or 'random'.
    image_size: the square input (a multiple of 14; 448 in the paper, 672 the larger).
    layer: the block whose tokens are compared (-1: the last).
    masking: zero-shot foreground masking (objects on plain backgrounds): 'auto' (the
      method's choice per category: on for MVTec AD's capsule, hazelnut, pill, screw and
      toothbrush and for every VisA category, off elsewhere), or true / false.
    rotations: the shots are added at these rotations (degrees, multiples of 90).
    chunk_size: bank rows per step of the nearest-neighbour search (memory bound:
      patches per batch x chunk_size floats).
  """
  return ml_collections.ConfigDict(
    {
      "backbone": "dinov2_vits14",
      "checkpoint": "",
      "image_size": 448,
      "layer": -1,
      "masking": "auto",
      "rotations": (0, 90, 180, 270),
      "chunk_size": 4096,
    }
  )


# AnomalyDINO's masking per category (its "masking test"): where the first principal
# component separates the object from a background that few shots cannot cover.
MASKED_CATEGORIES = {
  "mvtec_ad": {"capsule", "hazelnut", "pill", "screw", "toothbrush"},
  "visa": "all",
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def masking_for(setting, dataset: str | None, category: str | None) -> bool:
  """Whether to mask the background: `setting` true / false, or 'auto' (the method's
  per-category choice, `MASKED_CATEGORIES`; off for other data and outside a job).

  Raises:
    ConfigError: another value.
  """
  value = str(setting).strip().lower()
  if value in _TRUE or value in _FALSE:
    return value in _TRUE
  require(value == "auto", "anomalydino.masking", f"{setting!r}: use auto, true or false.")
  masked = MASKED_CATEGORIES.get(dataset or "", ())
  return masked == "all" or (category or "") in masked


def patch_multiple(size: int, patch: int = 14) -> int:
  """An input size: `size` rounded to the nearest multiple of the backbone's `patch`-px
  patches (DINOv2's 14 by default)."""
  return max(patch, int(round(int(size) / patch)) * patch)


def require_patch_multiple(
  size: int, field: str, patch: int = 14, network: str = "DINOv2", example: str = "448 or 672"
) -> None:
  """Checks an input size for a ViT of `patch`-px patches (DINOv2's by default): at least
  one patch; one that is not a multiple of the patch is used as the nearest multiple, and
  a warning says so.

  Raises:
    ConfigError: naming `field`.
  """
  require(
    isinstance(size, int) and size >= patch,
    field,
    f"{size!r} is smaller than one of {network}'s {patch}-px patches (e.g. {example}).",
  )
  if patch_multiple(size, patch) != size:
    log.warning(
      "--config.%s=%d is not a multiple of %s's %d-px patches: images are resized to "
      "%d px instead.",
      field,
      size,
      network,
      patch,
      patch_multiple(size, patch),
    )


def layer_tokens(model, layer: int, params, images):
  """(B, h, w, C) patch tokens of a DINOv2 (`model`, `params`) at block `layer`, through
  the final norm."""
  from maeday_jax.models import features

  net = features.DinoV2Features(model, params)
  return next(iter(net.patch_tokens(images, layers=(layer,), norm=True).values()))


@functools.cache
def _compiled_tokens(model, layer: int):
  """`layer_tokens` jitted once per architecture and layer for the whole process: every
  fit (each category of an evaluation) reuses its compilation."""
  import jax

  return jax.jit(functools.partial(layer_tokens, model, layer))


class AnomalyDino(Detector):
  """Cosine kNN of DINOv2 patch tokens to the shots' tokens; top-1 % mean image score."""

  method = "anomalydino"
  summary = "AnomalyDINO: DINOv2 patch kNN to the normal shots (training-free)"
  needs_shots = True
  SECTIONS = {"anomalydino": anomalydino_section}

  def __init__(self, settings):
    super().__init__(settings)
    self._net = None
    self._weights: weights_ref.PublicWeights | None = None
    # The masking `fit` chose (`masking_for`: 'auto' depends on the category), recorded.
    self._masking = masking_for(self._section.get("masking", "auto"), None, None)

  @classmethod
  def validate(cls, config) -> None:
    section = config.anomalydino
    require_patch_multiple(section.image_size, "anomalydino.image_size")
    rotations = list(section.rotations)
    require(
      bool(rotations) and all(int(r) % 90 == 0 for r in rotations),
      "anomalydino.rotations",
      f"{rotations}: give multiples of 90 degrees (0 keeps the shots as they are).",
    )
    require(section.chunk_size >= 1, "anomalydino.chunk_size", "must be >= 1.")
    masking_for(section.get("masking", "auto"), None, None)  # A bad value fails here.

  @property
  def _section(self):
    """This method's settings section (DINOv2 detectors share the rest)."""
    return self.settings.anomalydino

  @property
  def input_size(self) -> int:
    return patch_multiple(self._section.image_size)  # `validate` warns when it rounds.

  def describe(self) -> str:
    return f"{self.method} ({self._section.backbone})"

  def build(self) -> None:
    """Loads DINOv2 (the public checkpoint, a file, or random weights)."""
    import jax

    from maeday_jax import models

    section = self._section
    checkpoint = section.checkpoint or section.backbone
    if checkpoint == "random":
      log.warning("%s with a RANDOM DINOv2: its figures are meaningless.", self.method)
    self._net = models.load(section.backbone, checkpoint, key=jax.random.key(self.settings.seed))
    self._weights = weights_ref.PublicWeights.of(checkpoint, "dinov2")
    self.state = {"dinov2": self._net.params}

  def _tokens(self, params, images):
    """Patch tokens (B, h, w, C) of the chosen layer through the final norm: what the
    foreground masks are computed on (their threshold is on this scale)."""
    return layer_tokens(self._net.model, int(self.settings.anomalydino.layer), params, images)

  def _features(self, params, images):
    """The tokens L2-normalised (B, h, w, C): what the memory bank compares."""
    from maeday_jax import nearest_neighbors

    return nearest_neighbors.l2_normalize(self._tokens(params, images))

  def fit(self, normals, key) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from maeday_jax import foreground, nearest_neighbors

    del key  # Deterministic.
    if self._net is None:
      self.build()
    shots, _ = normals.images(self.input_size)
    if len(shots) == 0:
      raise ValueError("anomalydino needs at least one normal shot for its memory bank.")
    section = self.settings.anomalydino
    dataset = normals.data.get("name") if normals.data is not None else None
    self._masking = masking_for(section.get("masking", "auto"), dataset, normals.category)
    views = np.concatenate(
      [np.rot90(shots, int(r) // 90 % 4, axes=(1, 2)) for r in section.rotations]
    )
    layer = int(section.layer)
    tokens = _compiled_tokens(self._net.model, layer)(self.state["dinov2"], jnp.asarray(views))
    rows = np.asarray(nearest_neighbors.l2_normalize(tokens)).reshape(-1, tokens.shape[-1])
    if self._masking:
      masks = np.asarray(jax.jit(foreground.foreground_masks)(tokens)).reshape(-1)
      if masks.any():
        rows = rows[masks]
    self.state = {**self.state, "bank": jnp.asarray(rows)}

  def step_signature(self):
    section = self.settings.anomalydino
    return (
      "anomalydino",
      self._net.model,
      int(section.layer),
      self._masking,
      int(section.chunk_size),
    )

  def score_function(self, mesh, local_batch: int):
    import jax.numpy as jnp

    from maeday_jax import foreground, memory_budget, nearest_neighbors, patchcore

    section = self.settings.anomalydino
    masking, chunk = self._masking, int(section.chunk_size)
    patches = (self.input_size // self._net.model.patch_size) ** 2
    # The search holds (local patches x chunk) float32 distances at a time.
    memory_budget.require_fits(
      f"{local_batch} images per device at {self.input_size} px with chunks of {chunk} bank rows",
      4 * local_batch * patches * min(chunk, int(self.state["bank"].shape[0])),
      "anomalydino.chunk_size",
      mesh.devices.flat[0],
    )

    def score(state, images, ids, key):
      del ids, key  # Deterministic given the bank.
      tokens = self._tokens(state["dinov2"], images)
      features = nearest_neighbors.l2_normalize(tokens)
      batch, rows, cols, dim = features.shape
      d2, _ = nearest_neighbors.k_nearest(features.reshape(-1, dim), state["bank"], 1, chunk)
      # |a - b|^2 = 2 - 2 cos for unit vectors: the cosine distance is half of it.
      distances = jnp.clip(d2[:, 0] / 2.0, 0.0, 2.0).reshape(batch, rows, cols)
      if masking:
        distances = jnp.where(foreground.foreground_masks(tokens), distances, 0.0)
      flat = distances.reshape(batch, -1)
      top = max(int(flat.shape[1] * TOP_FRACTION), 1)
      scores = jnp.mean(jnp.sort(flat, axis=1)[:, -top:], axis=1)
      maps = patchcore.anomaly_map(distances, tuple(images.shape[1:3]))
      return maps, scores

    return score

  def saved_state(self) -> Any:
    return weights_ref.without_public(self.state, self._weights, "dinov2")

  def record(self) -> dict:
    from maeday_jax.models import dinov2

    record = weights_ref.network_record(self._weights, dinov2.architecture(self._net.model))
    return {**record, "masking": self._masking}

  def restore(self, record: dict, state: Any) -> None:
    from maeday_jax.models import dinov2, features

    def wrap(architecture, params):
      return features.DinoV2Features(dinov2.DinoV2(**architecture), params)

    self._weights, self._net, self.state = weights_ref.restore_network(
      record, state, "dinov2", self._section.backbone, wrap
    )
    self._masking = bool(record.get("masking", self._masking))

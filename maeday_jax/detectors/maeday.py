"""MAEDAY zero-shot: the reconstruction error of a pre-trained MAE under many random masks.

Nothing is fitted: the MAE's weights are the detector. Public checkpoints (a known name
such as `mae_vit_large`) are referenced in the artifact by name and SHA-256 and resolved
from the cache where it is loaded; any other weights (random, a local file, adapted
weights) are stored inside the artifact. See `maeday_jax.zero_shot` for the scoring.
"""

from __future__ import annotations

import logging
from typing import Any

from maeday_jax.config_errors import require
from maeday_jax.detectors import weights_ref
from maeday_jax.detectors.base import Detector
from maeday_jax.settings import model as model_settings

log = logging.getLogger("maeday_jax")


class ZeroShotMaeday(Detector):
  """Zero-shot MAEDAY (spec section 1): `num_masks` masks at `mask_ratio`, the channel-
  summed squared error averaged over masks and blurred; image score = the map's maximum.

  An image's masks come from the run's seed and the image's pixels, so its score does
  not depend on the batch, its name or the other images.
  """

  method = "maeday"
  summary = "zero-shot MAEDAY: MAE reconstruction error under random masks"
  SECTIONS = {
    "model": model_settings.model_config,
    "num_masks": 32,
    "mask_ratio": 0.75,
    "masking": "random",
    "mask_batch_size": 0,
  }

  def __init__(self, settings):
    super().__init__(settings)
    self._model = None
    # A public checkpoint, referenced in artifacts by name and hash.
    self._weights: weights_ref.PublicWeights | None = None

  @classmethod
  def validate(cls, config) -> None:
    from maeday_jax import model_builder

    require(config.num_masks >= 1, "num_masks", f"must be >= 1, got {config.num_masks}.")
    require(
      0.0 <= config.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {config.mask_ratio}."
    )
    require(
      config.masking in model_settings.MASKINGS,
      "masking",
      f"{config.masking!r} is not one of {', '.join(model_settings.MASKINGS)}.",
    )
    require(
      config.mask_batch_size >= 0,
      "mask_batch_size",
      f"must be >= 0 (0 = chosen from the device's memory), got {config.mask_batch_size}.",
    )
    model_builder.validate_model_config(config.model)
    model_builder.validate_masking(config, config.model)

  # -------------------------------------------------------------------------- model

  def build(self) -> None:
    """Loads the MAE named by the settings (random weights, a checkpoint, a name)."""
    import jax

    from maeday_jax import model_builder

    model_config = self.settings.model
    if model_config.checkpoint == model_settings.RANDOM_WEIGHTS:
      log.warning(
        "MAEDAY with RANDOM weights (model.checkpoint='random', variant %r): its maps are "
        "meaningless except for smoke tests.",
        model_config.variant,
      )
    self._model, params, _ = model_builder.build_model(
      model_config, jax.random.key(self.settings.seed)
    )
    # A checkpoint's patch count is known only now: checked before anything compiles.
    model_builder.check_visible_patches(self.settings, self._model.num_patches)
    self._weights = weights_ref.PublicWeights.of(
      str(model_config.checkpoint), "mae", model_config.get("cache_dir") or None
    )
    self.state = {"mae": params}

  @property
  def model(self):
    if self._model is None:
      self.build()
    return self._model

  @property
  def input_size(self) -> int:
    return int(self.model.img_size)

  @property
  def reconstructor(self):
    return self.model, self.state["mae"]

  def describe(self) -> str:
    return f"{self.method} ({self.settings.model.checkpoint}, {self.settings.num_masks} masks)"

  # ---------------------------------------------------------------------- interface

  def fit(self, normals, key) -> None:
    del normals, key  # Zero-shot: the pre-trained MAE is the whole detector.
    self.model  # noqa: B018  (builds it)

  def _mask_batch(self, mesh, local_batch: int):
    from maeday_jax import memory_budget

    settings = self.settings
    return settings.mask_batch_size or memory_budget.mask_batch_size(
      self.model, local_batch, settings.num_masks, settings.mask_ratio, mesh.devices.flat[0]
    )

  def step_signature(self):
    s = self.settings
    return ("maeday", self.model, s.num_masks, float(s.mask_ratio), s.masking, s.mask_batch_size)

  def score_function(self, mesh, local_batch: int):
    from maeday_jax import zero_shot

    model, settings = self.model, self.settings
    mask_batch = self._mask_batch(mesh, local_batch)
    score = zero_shot.score_function(
      model, settings.num_masks, settings.mask_ratio, mask_batch, settings.masking
    )

    def detector_score(state, images, ids, key):
      return score(state["mae"], images, ids, key)

    return detector_score

  def tiled_image_scores(self, maps, tile_scores):
    from maeday_jax import zero_shot

    # MAEDAY's image score is its map's maximum: the stitched map's.
    del tile_scores
    return zero_shot.image_scores(maps)

  def saved_state(self) -> Any:
    # Public weights are referenced by name and hash, not copied into every artifact.
    return {} if self._weights is not None else self.state

  def record(self) -> dict:
    from maeday_jax import models

    weights = self._weights.record() if self._weights is not None else None
    return {"architecture": models.architecture(self.model), "weights": weights}

  def restore(self, record: dict, state: Any) -> None:
    from maeday_jax import model_builder, models

    dtype = model_builder.compute_dtype(self.settings.model.dtype)
    attention = self.settings.model.get("attention", "auto")
    if record.get("weights"):
      self._weights = weights_ref.PublicWeights.from_record(record["weights"])
      # Resolved in this machine's cache (`$MAEDAY_CACHE_DIR`), not the fitting one's.
      self._model, params = weights_ref.load_referenced_mae(record["weights"], dtype, attention)
      state = {"mae": params}
    else:
      self._model = models.MaskedAutoencoder(
        **record["architecture"], dtype=dtype, attention=attention
      )
    self.state = state

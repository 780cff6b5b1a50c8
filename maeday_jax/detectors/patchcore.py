"""PatchCore as anomalib computes it (`maeday_jax.patchcore`): a memory bank of the
shots' mid-level backbone features; the map is each patch's distance to its nearest bank
row, the image score anomalib's re-weighted maximum.

The artifact stores the bank, and the backbone's variables unless they are public
torchvision weights (then referenced by name and SHA-256).
"""

from __future__ import annotations

import logging
from typing import Any

from maeday_jax.config_errors import require
from maeday_jax.detectors import weights_ref
from maeday_jax.detectors.base import Detector
from maeday_jax.settings import model as model_settings
from maeday_jax.settings import patchcore as patchcore_settings

log = logging.getLogger("maeday_jax")


class PatchCore(Detector):
  """PatchCore (Roth et al.) on a ResNet / WideResNet's layer2 + layer3 features.

  `bank_index` picks the coreset's random stream (two banks of the same shots differ
  only by it: `patchcore_x2`).
  """

  method = "patchcore"
  summary = "PatchCore: kNN to a coreset memory bank of backbone patch features"
  needs_shots = True
  SECTIONS = {"patchcore": patchcore_settings.patchcore_config}
  bank_index = 0

  def __init__(self, settings):
    super().__init__(settings)
    self._model = None
    self._weights: weights_ref.PublicWeights | None = None
    self._grid = (0, 0)

  @classmethod
  def validate(cls, config) -> None:
    pc = config.patchcore
    require(0.0 < pc.coreset_ratio <= 1.0, "patchcore.coreset_ratio", "must be in (0, 1].")
    require(pc.image_size >= 32, "patchcore.image_size", "must be >= 32.")

  @property
  def input_size(self) -> int:
    return int(self.settings.patchcore.image_size)

  def describe(self) -> str:
    return f"{self.method} ({self.settings.patchcore.backbone})"

  def build(self) -> None:
    """Loads the backbone (random weights, a file or a public name)."""
    import jax

    from maeday_jax import backbones

    pc = self.settings.patchcore
    if pc.backbone == model_settings.RANDOM_WEIGHTS:
      log.warning("PatchCore backbone with RANDOM weights: its figures are meaningless.")
      self._model = backbones.create(pc.variant)
      variables = backbones.init_variables(self._model, jax.random.key(self.settings.seed))
    else:
      cache = pc.cache_dir or None
      self._model, variables = backbones.load_backbone(pc.backbone, cache_dir=cache)
      self._weights = weights_ref.PublicWeights.of(pc.backbone, "backbone", cache)
    self.state = {"backbone": variables}

  def fit(self, normals, key) -> None:
    import jax

    from maeday_jax import patchcore

    if self._model is None:
      self.build()
    shots, _ = normals.images(self.input_size)
    if len(shots) == 0:
      raise ValueError("patchcore needs at least one normal shot for its memory bank.")
    bank = patchcore.fit(
      self._model,
      self.state["backbone"],
      shots,
      jax.random.fold_in(key, 100 + self.bank_index),
      coreset_ratio=self.settings.patchcore.coreset_ratio,
    )
    self._grid = tuple(int(g) for g in bank.grid)
    self.state = {**self.state, "bank": bank.rows}

  def with_bank(self, index: int) -> PatchCore:
    """A twin (sharing the backbone) whose coreset draws from stream `index`."""
    twin = self.with_seed(int(self.settings.seed))
    twin.bank_index = int(index)
    return twin

  def step_signature(self):
    return ("patchcore", self._model, self._grid)

  def score_function(self, mesh, local_batch: int):
    from maeday_jax import patchcore

    model, grid = self._model, self._grid

    def score(state, images, ids, key):
      del ids, key  # Deterministic given the bank.
      bank = patchcore.MemoryBank(rows=state["bank"], grid=grid)
      return patchcore.score(model, state["backbone"], bank, images)

    return score

  def saved_state(self) -> Any:
    if self._weights is None:
      return self.state
    return {"bank": self.state["bank"]}

  def record(self) -> dict:
    model = self._model
    return {
      "backbone": {
        "block": model.block,
        "layers": list(model.layers),
        "width": model.width,
        "width_per_group": model.width_per_group,
      },
      "weights": self._weights.record() if self._weights is not None else None,
      "grid": list(self._grid),
    }

  def restore(self, record: dict, state: Any) -> None:
    from maeday_jax import backbones

    self._grid = tuple(record["grid"])
    if record.get("weights"):
      self._weights = weights_ref.PublicWeights.from_record(record["weights"])
      self._model, variables = weights_ref.load_referenced_backbone(record["weights"])
      state = {**state, "backbone": variables}
    else:
      arch = dict(record["backbone"])
      arch["layers"] = tuple(arch["layers"])
      self._model = backbones.ResNet(**arch)
    self.state = state

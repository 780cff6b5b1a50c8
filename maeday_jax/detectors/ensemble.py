"""Ensembles: the sum of several detectors' maps and scores, each standardised by its own
statistics on held-out normal images (`maeday_jax.ensemble`; the paper sums raw values,
`--config.ensemble.normalize=False`).

    --config.detector=ensemble --config.members=maeday_lora,patchcore

Members fit on the same shots. Members of different input sizes sum too: the images are
read at the largest member's size and resized on device for the others, whose maps are
resized back (bilinear, antialiased). `patchcore_x2` is the paper's "2 x PC": two
PatchCore banks of the same shots from different coreset keys.
"""

from __future__ import annotations

import logging
from typing import Any

import ml_collections
import numpy as np

from maeday_jax.config_errors import require
from maeday_jax.detectors import registry
from maeday_jax.detectors.base import Detector
from maeday_jax.detectors.patchcore import PatchCore

log = logging.getLogger("maeday_jax")


def member_names(value) -> list[str]:
  """The member methods of `--config.members` (comma-separated or a list)."""
  names = value.split(",") if isinstance(value, str) else list(value)
  return [n.strip() for n in names if n.strip()]


class Ensemble(Detector):
  """The sum of its members' standardised maps and image scores."""

  method = "ensemble"
  summary = "sum of several detectors, each standardised on held-out normals"
  SECTIONS = {
    "members": "maeday_lora,patchcore",
    "ensemble": lambda: ml_collections.ConfigDict({"normalize": True}),
  }

  def __init__(self, settings):
    super().__init__(settings)
    self.members: list[Detector] = self._make_members()
    self.norms: list[dict | None] = [None] * len(self.members)
    # Transductive when any member is: the batch's valid rows then reach those members.
    self.transductive = any(m.transductive for m in self.members)

  # ------------------------------------------------------------------- settings

  @classmethod
  def member_methods(cls, config) -> list[str]:
    return member_names(config.get("members", cls.SECTIONS["members"]))

  @classmethod
  def sections(cls, config) -> list[str]:
    names = list(cls.SECTIONS)
    for member in cls.member_methods(config):
      names += [s for s in registry.get(member).sections(config) if s not in names]
    return names

  @classmethod
  def scores_groups(cls, config) -> bool:
    return any(registry.get(m).scores_groups(config) for m in cls.member_methods(config))

  @classmethod
  def validate(cls, config) -> None:
    members = cls.member_methods(config)
    require(len(members) >= 2, "members", "an ensemble needs at least two members.")
    for member in members:
      registry.check_name(member, "members")
      require(member not in ("ensemble",), "members", "an ensemble cannot contain an ensemble.")
      registry.get(member).validate(config)

  def _make_members(self) -> list[Detector]:
    settings = self.settings
    if settings.get(registry.TILING) is not None:
      # The ensemble is tiled as a whole: its members score the tiles it gives them.
      settings = ml_collections.ConfigDict(settings.to_dict())
      settings[registry.TILING].mode = "none"
    return [registry.get(name)(settings) for name in member_names(settings.members)]

  def requires_shots(self) -> bool:
    return any(m.requires_shots() for m in self.members)

  @property
  def input_size(self) -> int:
    # The largest member's: the others see the batch resized on device to their own
    # input, and their maps are resized back, so members of any sizes sum.
    return max(m.input_size for m in self.members)

  def describe(self) -> str:
    return f"{self.method}({' + '.join(m.describe() for m in self.members)})"

  @property
  def reconstructor(self):
    return next((m.reconstructor for m in self.members if m.reconstructor), None)

  # ------------------------------------------------------------------ interface

  def fit(self, normals, key) -> None:
    from maeday_jax.detectors import fitting

    for i, member in enumerate(self.members):
      fitting.fit_with_statistics(member, normals, key, subdir=f"member_{i}_{member.method}")
    self._combine()

  @classmethod
  def from_fitted(cls, settings, members: list[Detector]) -> Ensemble:
    """The ensemble of already fitted members (with their normal statistics), e.g. to
    compare it with its members without fitting them twice."""
    ensemble = cls.__new__(cls)
    Detector.__init__(ensemble, settings)
    ensemble.members = list(members)
    ensemble.transductive = any(m.transductive for m in members)
    ensemble._combine()
    return ensemble

  def _combine(self) -> None:
    """The members' standardisations (their normal statistics, or the raw sum) and the
    state: every member's state plus the statistics as one array."""
    self.norms = [None] * len(self.members)
    if self.settings.ensemble.normalize:
      self.norms = [m.normal_statistics for m in self.members]
      for member, norm in zip(self.members, self.norms, strict=True):
        if norm is None:
          log.warning(
            "%s: fewer than two held-out normal images (or no spread): its raw values are summed.",
            member.method,
          )
    self.state = self._state()

  def _state(self) -> dict:
    from maeday_jax import ensemble

    table = [
      [*(ensemble.Standardization(**n) if n else ensemble.RAW).to_dict().values()]
      for n in self.norms
    ]
    # The statistics travel as data, not as constants of the compiled step: ensembles of
    # other categories and seeds reuse one compilation.
    state = {f"member_{i}": m.state for i, m in enumerate(self.members)}
    return {**state, "norms": np.asarray(table, np.float32)}

  def step_signature(self):
    signatures = [m.step_signature() for m in self.members]
    return None if None in signatures else (self.method, *signatures)

  def score_function(self, mesh, local_batch: int):
    import jax

    from maeday_jax import ensemble

    functions = [m.score_function(mesh, local_batch) for m in self.members]
    grouped = [m.transductive for m in self.members]
    sizes = [m.input_size for m in self.members]
    size = self.input_size

    def resized(images, member_size):
      if member_size == size:
        return images
      shape = (images.shape[0], member_size, member_size, images.shape[-1])
      return jax.image.resize(images, shape, "linear", antialias=True)

    def full_size(maps):
      if maps.shape[-1] == size:
        return maps
      return jax.image.resize(maps, (maps.shape[0], size, size), "linear", antialias=True)

    def score(state, images, ids, key, *valid):
      # `valid` (transductive ensembles only) goes to the members that score groups.
      outputs = []
      for i, fn in enumerate(functions):
        extra = valid if grouped[i] else ()
        maps, scores = fn(state[f"member_{i}"], resized(images, sizes[i]), ids, key, *extra)
        outputs.append((full_size(maps), scores))
      norms = [ensemble.Standardization(*row) for row in state["norms"]]
      return ensemble.combine(outputs, norms)

    return score

  def saved_state(self) -> Any:
    return {f"member_{i}": m.saved_state() for i, m in enumerate(self.members)}

  def record(self) -> dict:
    return {
      "members": [
        {"method": m.method, "record": m.record(), "normal_statistics": m.normal_statistics}
        for m in self.members
      ],
      "norms": self.norms,
    }

  def restore(self, record: dict, state: Any) -> None:
    self.norms = list(record["norms"])
    for i, (member, entry) in enumerate(zip(self.members, record["members"], strict=True)):
      if member.method != entry["method"]:
        raise ValueError(f"member {i} is {entry['method']}, the settings say {member.method}.")
      member.restore(entry["record"], state.get(f"member_{i}", {}))
      member.normal_statistics = entry.get("normal_statistics")
    self.state = self._state()

  def with_seed(self, seed: int) -> Ensemble:
    twin = super().with_seed(seed)
    twin.members = [m.with_seed(seed) for m in self.members]
    return twin


class PatchCoreX2(Ensemble):
  """The paper's "2 x PC": two PatchCore banks of the same shots from different coreset
  keys, summed like any ensemble."""

  method = "patchcore_x2"
  summary = "two PatchCore banks from different coreset keys, summed"
  needs_shots = True
  SECTIONS = {
    "patchcore": PatchCore.SECTIONS["patchcore"],
    "ensemble": Ensemble.SECTIONS["ensemble"],
  }

  @classmethod
  def sections(cls, config) -> list[str]:
    return list(cls.SECTIONS)

  @classmethod
  def scores_groups(cls, config) -> bool:
    return False

  @classmethod
  def validate(cls, config) -> None:
    PatchCore.validate(config)

  def _make_members(self) -> list[Detector]:
    first = PatchCore(self.settings)
    return [first, first.with_bank(1)]

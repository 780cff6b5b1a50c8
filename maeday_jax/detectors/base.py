"""The interface every detector implements.

A detector is built from the settings of a job config, `fit` on zero or more normal
images, and then scores batches with a pure function:

    detector = registry.create("patchcore", config)
    detector.fit(normals, key)                      # zero-shot methods: statistics only
    score = detector.score_function(mesh, local_batch=8)
    maps, scores = score(detector.state, images, ids, key)   # jittable, per batch

`state` is the pytree of arrays the detector learned (or loaded): weights stored inside
the artifact, memory banks, adapted parameters. Everything else it needs to rebuild
itself is JSON (`record`): the architecture, the public weights it references by name and
SHA-256, normal statistics. `artifact.save` writes both; `artifact.load` rebuilds the
detector with `restore(record, state)`.

Detector modules keep their heavy imports (JAX models, training code, Orbax) inside their
methods: the job configs read every method's `SECTIONS` defaults from these modules and
must stay cheap to load (no JAX).
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import ml_collections
import numpy as np

from maeday_jax.config_errors import ConfigError

# `score(state, images, ids, key) -> (maps (B, S, S), scores (B,))` for ImageNet-
# normalised images (B, S, S, 3) at the detector's `input_size`; `ids` (B, 2) uint32 are
# the images' content ids (`zero_shot.image_ids`), from which stochastic detectors draw
# per-image randomness, so a score never depends on the batch.
ScoreFunction = Callable[[Any, Any, Any, Any], tuple[Any, Any]]


@dataclasses.dataclass
class NormalImages:
  """The normal images a detector may fit on, read at whatever size it needs.

  Attributes:
    read: `read(size) -> (shots, heldout)`: float32 (K, S, S, 3) and (H, S, S, 3)
      ImageNet-normalised images at `size` (K may be 0 for zero-shot methods; the held-out
      normals are normal images that are not shots, for normal statistics).
    data: the job's `config.data` (methods that train on whole data sources, MALA and
      MAE pre-training, read their images from it); None outside a job.
    extra_data: further training sources (`config.extra_data`).
    workdir: a folder for resumable training state (None: train without checkpoints).
    category: the category the images are of (methods with per-category defaults read
      it with `data.name`); None outside a job.
    read_native: `read_native(aspect) -> (shots, heldout)`: lists of float32 (h, w, 3)
      images read with their aspect ratio kept (`aspect`: a `resizing.KeepAspect`), for
      detectors that tile images at their own size (`tiling_native`).
  """

  read: Callable[[int], tuple[np.ndarray, np.ndarray]]
  data: ml_collections.ConfigDict | None = None
  extra_data: list = dataclasses.field(default_factory=list)
  workdir: Any = None
  category: str | None = None
  read_native: Callable[[Any], tuple[list, list]] | None = None
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def images(self, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(shots, heldout) at `size`, read once per size."""
    if size not in self._cache:
      self._cache[size] = self.read(size)
    return self._cache[size]

  def native_images(self, aspect) -> tuple[list, list]:
    """(shots, heldout) with their aspect ratio kept (`read_native`), read once."""
    if self.read_native is None:
      raise ValueError("these normal images were given without a reader at their own size.")
    if aspect not in self._cache:
      self._cache[aspect] = self.read_native(aspect)
    return self._cache[aspect]

  @classmethod
  def from_arrays(cls, shots: np.ndarray, heldout: np.ndarray | None = None, **fields):
    """Normal images given as arrays (e.g. in a notebook), resized when a detector reads
    them at another size (or, tiling at their own size, to its short side)."""
    shots = np.asarray(shots, np.float32)
    heldout = np.zeros((0, *shots.shape[1:]), np.float32) if heldout is None else heldout

    def resize(x: np.ndarray, size: int) -> np.ndarray:
      x = np.asarray(x, np.float32)
      if len(x) == 0:
        return np.zeros((0, size, size, 3), np.float32)
      if x.shape[1:3] == (size, size):
        return x
      from maeday_jax import resizing

      channels_first = resizing.resize_maps_bilinear(np.moveaxis(x, -1, 1), size)
      return np.moveaxis(channels_first, 1, -1)

    def read(size: int):
      return resize(shots, size), resize(heldout, size)

    def read_native(aspect):
      from maeday_jax import resizing

      def one(image):
        return resizing.resize_float_image(image, aspect.size(*image.shape[:2]))

      return [one(x) for x in shots], [one(x) for x in heldout]

    return cls(read=read, read_native=read_native, **fields)


class Detector(abc.ABC):
  """An anomaly detector: settings, what it learned, and a pure batch scoring function.

  Class attributes:
    method: the registry name.
    summary: one line for tables and `--help`-style listings.
    SECTIONS: the job-config fields this method reads, with their defaults (plain values,
      or functions returning a fresh ConfigDict); the jobs' configs hold every registered
      method's sections.
    needs_shots: True when `fit` needs at least one normal image.
    transductive: True when an image's score depends on the other images of its batch
      (say why in the docstring; e.g. MuSc scores each image against the other unlabeled
      images of its group). Its score function then takes one more argument:
      `score(state, images, ids, key, valid) -> (maps, scores)`, `valid` (B,) bool
      sharded like the images, False for rows that are not images of the group (padding
      of a short batch, unreadable files, other processes' copies): those rows must not
      change the valid rows' maps or scores, and their own outputs are discarded (they
      need only be computable). The group is the global batch (`scoring.compile_step`
      passes `valid` to such detectors only); the bulk job scores and commits groups of
      `--config.group_size` consecutive images of the sorted listing.
    trains_on_sources: True when `fit` trains on the whole `config.data` sources instead
      of shots (MALA, MAE pre-training).
  """

  method: ClassVar[str] = ""
  summary: ClassVar[str] = ""
  SECTIONS: ClassVar[dict[str, Any]] = {}
  needs_shots: ClassVar[bool] = False
  transductive: ClassVar[bool] = False
  trains_on_sources: ClassVar[bool] = False

  def __init__(self, settings: ml_collections.ConfigDict):
    self.settings = settings
    self.state: Any = {}
    # Per-pixel and per-image mean/std of the detector on normal images, when fitted
    # with held-out normals (`fit_statistics`); ensembles standardise by them.
    self.normal_statistics: dict | None = None
    # The held-out normals' image scores (NumPy), kept by `fit_statistics` so that a
    # threshold on them costs no second scoring pass; not saved with the artifact.
    self.heldout_scores: np.ndarray | None = None
    # Set on a detector loaded from an artifact: its fitted threshold ({"method",
    # "value"} or None) and what the fit saw (shots, held-out normals).
    self.threshold: dict | None = None
    self.fit_record: dict = {}

  # ----------------------------------------------------------------------- settings

  @classmethod
  def default_sections(cls) -> dict[str, Any]:
    """The job-config sections this method reads, with their defaults (fresh copies)."""
    return {name: _copy(value) for name, value in cls.SECTIONS.items()}

  @classmethod
  def sections(cls, config: ml_collections.ConfigDict) -> list[str]:
    """The job-config sections this detector reads under `config` (ensembles add their
    members')."""
    return list(cls.SECTIONS)

  @classmethod
  def scores_groups(cls, config: ml_collections.ConfigDict) -> bool:
    """Whether this method with these settings is transductive (ensembles: whether any
    member is), read without building anything."""
    del config
    return bool(cls.transductive)

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict) -> None:
    """Checks this method's settings in a job config before any data or model is loaded.

    Raises:
      ConfigError: naming the field and what to do.
    """
    del config  # Methods without settings to check.

  # --------------------------------------------------------------------- lifecycle

  @property
  @abc.abstractmethod
  def input_size(self) -> int:
    """The square size (pixels) images are read at for this detector."""

  @abc.abstractmethod
  def fit(self, normals: NormalImages, key) -> None:
    """Learns from the normal images (sets `self.state`); zero-shot methods only build."""

  @abc.abstractmethod
  def score_function(self, mesh, local_batch: int) -> ScoreFunction:
    """The pure batch scoring function (not jitted: the caller jits it over `mesh`).

    `local_batch` is the number of images each device scores per call, for methods that
    size their passes by memory.
    """

  @abc.abstractmethod
  def record(self) -> dict:
    """JSON-able description needed to rebuild the detector (besides its settings and
    `state`): architecture, referenced public weights and their SHA-256, ..."""

  @abc.abstractmethod
  def restore(self, record: dict, state: Any) -> None:
    """Rebuilds the fitted detector from `record()` and `state` (as saved)."""

  # ------------------------------------------------------------------------ tiling

  @property
  def tiling(self):
    """The detector's `tiling.Tiling` (settings section `tiling`), or None when it scores
    whole images."""
    from maeday_jax import tiling

    section = self.settings.get("tiling")
    if section is None or section.get("mode", "none") == "none":
      return None  # Without asking `input_size`: some detectors know it only once fitted.
    return tiling.from_settings(section, self.input_size)

  @property
  def read_size(self) -> int:
    """The square size images are read at to be scored: the input size, or the tiled
    image size."""
    tiling = self.tiling
    return self.input_size if tiling is None else tiling.image_size

  def scoring_function(self, mesh, local_batch: int) -> ScoreFunction:
    """`score_function`, on `read_size` images: tiled when the settings ask for it.

    Raises:
      ConfigError: tiling asked of a transductive detector.
    """
    tiling = self.tiling
    if tiling is None:
      return self.score_function(mesh, local_batch)
    from maeday_jax import tiling as tiles

    self.refuse_tiling_if_transductive()
    per_pass = tiles.tiles_per_pass(tiling, local_batch)
    inner = self.score_function(mesh, local_batch * per_pass)
    return tiles.tiled(inner, tiling, per_pass, self.tiled_image_scores)

  def refuse_tiling_if_transductive(self) -> None:
    """Tiles cannot be scored against each other's images (yet).

    Raises:
      ConfigError: this detector is transductive.
    """
    if self.transductive:
      raise ConfigError(
        f"--config.tiling.mode: {self.method} scores images against each other; it cannot "
        "score tiles yet. Use --config.tiling.mode=none."
      )

  def tiled_image_scores(self, maps, tile_scores):
    """A tiled image's score from its stitched map (B, S, S) and its tiles' scores (B, n):
    by default the largest tile score (for detectors whose score is their most anomalous
    patch's, the most anomalous patch of any tile). Jittable."""
    del maps
    return tile_scores.max(axis=1)

  def saved_state(self) -> Any:
    """The part of `state` the artifact stores (default: all of it; public weights that
    `record` references by name and hash are left out)."""
    return self.state

  # ------------------------------------------------------------------ conveniences

  def describe(self) -> str:
    """A short human-readable description for logs."""
    return self.method

  def step_signature(self):
    """A hashable identity of `score_function`'s computation (everything it closes over),
    or None. Detectors with equal signatures share one compiled step: a recipe that fits
    one detector per category and seed then compiles once."""
    return None

  def with_seed(self, seed: int) -> Detector:
    """An unfitted twin with another seed that shares this detector's networks and
    pre-trained weights (loaded once for many seeds and categories)."""
    twin = copy.copy(self)
    twin.settings = ml_collections.ConfigDict(self.settings.to_dict())
    twin.settings.seed = int(seed)
    twin.normal_statistics = None
    twin.heldout_scores = None
    return twin

  def requires_shots(self) -> bool:
    """Whether `fit` needs at least one normal shot."""
    return self.needs_shots

  def scoring_key(self):
    """The key a score function receives: from the detector's own seed, so the same
    artifact scores the same image identically in every job."""
    import jax

    return jax.random.key(int(self.settings.get("seed", 0)))

  @property
  def reconstructor(self):
    """(model, params) of an MAE whose reconstructions illustrate the maps, or None."""
    return None


def _copy(value):
  # A section is a value or a function that builds a fresh ConfigDict (placeholders and
  # field references keep their types, which command-line overrides need).
  return value() if callable(value) else value

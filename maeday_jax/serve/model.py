"""The detector a service scores with: a detector, a fitted artifact or an exported
StableHLO folder, behind one fixed-size batch function compiled once.

    model = load_model("runs/line3/detector", max_batch=8)
    maps, scores = model.score(images)   # (N <= max_batch, S, S, 3) normalised -> NumPy

Every batch is padded to `max_batch` rows (zeros; each row is scored on its own), so the
step compiles once, at start-up (`warm_up`), and never while answering a request.
Transductive detectors (MuSc, ensembles with a MuSc member) are refused: an image's score
would depend on whichever requests happened to share its batch.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from collections.abc import Callable

import numpy as np

log = logging.getLogger("maeday_jax")

# The file that tells an exported folder (`maeday_jax.exported`) from a detector artifact
# (both hold a manifest.json).
EXPORTED_MODULE = "model.stablehlo"


class ServeError(ValueError):
  """A detector the service cannot serve; the message names it and what to do."""


@dataclasses.dataclass
class ServedModel:
  """A detector ready to score fixed-size batches.

  Attributes:
    name: what scores, for answers and logs.
    input_size: the square size images are resized to.
    max_batch: rows of every call to `run` (the compiled batch).
    run: `run(images (max_batch, S, S, 3) float32) -> (maps (max_batch, H, W), scores
      (max_batch,))` as NumPy.
    threshold: the artifact's fitted threshold value (anomalous when score >= it), or None.
    aspect: a `resizing.KeepAspect` when images keep their aspect ratio (the detector
      tiles each at its own size, `tiling.resize_short_side`; its maps come back at
      `input_size` x `input_size`); `run` then takes a list (None for padding).
  """

  name: str
  input_size: int
  max_batch: int
  run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
  threshold: float | None = None
  aspect: object = None  # A resizing.KeepAspect, or None (square inputs).

  def score(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(maps, scores) of up to `max_batch` normalised images, padded to the compiled batch
    (a sequence of (S, S, 3) images, or of any sizes with `aspect`)."""
    count = len(images)
    if not 0 < count <= self.max_batch:
      raise ValueError(f"{count} images for a batch of {self.max_batch}")
    if self.aspect is not None:
      batch = [*images, *[None] * (self.max_batch - count)]
    else:
      batch = np.zeros((self.max_batch, *np.shape(images[0])), np.float32)
      batch[:count] = np.stack(images)
    maps, scores = self.run(batch)
    return np.asarray(maps[:count], np.float32), np.asarray(scores[:count], np.float32)

  def warm_up(self) -> None:
    """Compiles (runs once) before the first request."""
    size = self.input_size
    self.score(np.zeros((1, size, size, 3), np.float32))


def _threshold(record: dict | None) -> float | None:
  """The value of a manifest's threshold ({"method", "value"}), or None."""
  if not isinstance(record, dict) or record.get("value") is None:
    return None
  return float(record["value"])


def _refuse_transductive(name: str) -> ServeError:
  return ServeError(
    f"detector {name} is transductive (an image's score depends on the other images "
    "scored with it), so a served score would depend on which requests share its batch; "
    "score it with the bulk job (configs/score.py, --config.group_size) instead."
  )


def _from_detector(detector, name: str, max_batch: int) -> ServedModel:
  import jax

  from maeday_jax import batch_step, evaluation, parallel

  if detector.transductive:
    raise _refuse_transductive(name)
  if jax.process_count() > 1:
    raise ServeError("the service runs on one process; start it without jax.distributed.")
  devices = parallel.data_mesh().devices.size
  batch = -(-max_batch // devices) * devices  # Every device scores the same number of rows.
  # The bulk job's own scoring (`jobs.score`): the same step, key and input size.
  scoring = evaluation.Scoring.for_detector(detector, batch_size=batch)

  def run(images):
    return batch_step.score_local(
      scoring.score_fn,
      scoring.replicated,
      images,
      scoring.key,
      scoring.mesh,
      scoring.resize_fn,
    )

  threshold = _threshold(detector.threshold)
  return ServedModel(name, scoring.image_size, batch, run, threshold, scoring.aspect)


def _from_export(folder: pathlib.Path, max_batch: int) -> ServedModel:
  from maeday_jax import exported

  net = exported.load(folder)
  if net.manifest.get("transductive"):
    raise _refuse_transductive(str(folder))
  name = f"{net.manifest.get('description') or net.manifest.get('method')} (exported {folder})"
  threshold = _threshold(net.manifest.get("threshold"))
  return ServedModel(name, net.input_size, max_batch, net.score, threshold)


def load_model(source, max_batch: int = 8, warm_up: bool = True) -> ServedModel:
  """The model a service scores with: a `maeday_jax.detectors` detector (fitted, or
  zero-shot and built), a fitted detector folder (`maeday_jax.detectors.load`), or an
  exported folder (it holds `model.stablehlo`; `maeday_jax.exported`).

  A detector runs data-parallel over the local devices: `max_batch` is rounded up to a
  multiple of their number (the model's `max_batch` says what it is).

  Raises:
    ServeError: a transductive detector (refused before any weights are loaded), or a
      bad `max_batch`.
    ArtifactError, ExportError: the folder cannot be used (the message names it and what
      to do).
  """
  import ml_collections

  from maeday_jax import detectors
  from maeday_jax.detectors import artifact, registry
  from maeday_jax.detectors.base import Detector

  if max_batch < 1:
    raise ServeError(f"max_batch must be >= 1, got {max_batch}.")
  if isinstance(source, Detector):
    model = _from_detector(source, source.describe(), max_batch)
  else:
    folder = pathlib.Path(os.fspath(source)).expanduser()
    if (folder / EXPORTED_MODULE).is_file():
      model = _from_export(folder, max_batch)
    else:
      manifest = artifact.read_manifest(folder)  # A bad folder fails here, with the reason.
      settings = ml_collections.ConfigDict(manifest["settings"])
      if registry.get(manifest["method"]).scores_groups(settings):
        raise _refuse_transductive(str(folder))
      detector = detectors.load(folder)
      model = _from_detector(detector, f"{detector.describe()} ({folder})", max_batch)
  if warm_up:
    model.warm_up()
  log.info(
    "Serving %s: %d px inputs, batches of %d.", model.name, model.input_size, model.max_batch
  )
  return model

"""Which detector a job runs: a registered method by name, or a fitted artifact folder."""

from __future__ import annotations

import logging
import os

import ml_collections
import numpy as np

from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import registry

log = logging.getLogger("maeday_jax")


def is_path(spec: str) -> bool:
  """Whether `--config.detector` names a folder rather than a method."""
  return spec not in registry.METHODS and (
    os.sep in spec or "/" in spec or spec.startswith((".", "~")) or os.path.exists(spec)
  )


def check(config: ml_collections.ConfigDict, default: str = "maeday") -> str:
  """`config.detector` (or `default` when empty), checked before any data or model is
  loaded: a registered method, whose settings are then validated, or a path.

  Raises:
    ConfigError: an unknown method (listing the known ones) or invalid settings.
  """
  spec = str(config.get("detector") or default)
  if is_path(spec):
    from maeday_jax.detectors import artifact

    artifact.read_manifest(spec)  # A missing, unreadable or unknown artifact fails now.
    return spec
  cls = registry.get(registry.check_name(spec))
  cls.validate(config)
  registry.validate_tiling(cls, config)
  return spec


def load(config: ml_collections.ConfigDict, spec: str, job: str, model_dtype: str | None = None):
  """The detector of `spec` ready to score: a fitted artifact, or a method that needs no
  fitting (zero-shot), built from `config`; `model_dtype`, when given, replaces the
  compute dtype `model.dtype` of either.

  Raises:
    ArtifactError: the artifact cannot be used.
    ConfigError: the method must be fitted first (shots or training).
  """
  from maeday_jax import detectors

  if is_path(spec):
    detector = detectors.load(spec, model_dtype=model_dtype)
    log.info("Detector: %s, fitted artifact %s", detector.describe(), spec)
    return detector
  if model_dtype is not None and config.get("model") is not None:
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = model_dtype
  detector = detectors.create(config, spec)
  if detector.requires_shots() or detector.trains_on_sources:
    raise ConfigError(
      f"--config.detector={spec} must be fitted first (it learns from normal images): run "
      f"`python -m maeday_jax.main --config configs/fit.py --config.detector={spec} ...` "
      f"and pass its <workdir>/detector folder to the {job} job."
    )

  def nothing(size):
    empty = np.zeros((0, size, size, 3), np.float32)
    return empty, empty

  detector.fit(detectors.NormalImages(read=nothing), detector.scoring_key())
  log.info("Detector: %s (zero-shot, nothing fitted)", detector.describe())
  return detector


def scoring(detector, config: ml_collections.ConfigDict):
  """The `evaluation.Scoring` of `detector` with a job's batch, metric resolution and
  decoding settings (`batch_size`, `eval_size`, `data.num_workers`, `data.prefetch`)."""
  from maeday_jax import evaluation

  return evaluation.Scoring.for_detector(
    detector,
    batch_size=config.batch_size,
    eval_size=config.get("eval_size") or None,
    eval_original_max_side=int(config.get("eval_original_max_side") or 0),
    num_workers=config.data.num_workers,
    prefetch=config.data.prefetch,
  )

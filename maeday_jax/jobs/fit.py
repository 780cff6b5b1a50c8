"""The fit job: fit one detector on normal training images and save it as an artifact.

    python -m maeday_jax.main --config configs/fit.py --config.detector=patchcore \
      --config.data.name=folder --config.data.path=/line3/test \
      --config.data.normal_path=/line3/good --config.shots=4 --workdir runs/line3_pc

Outputs under the work directory:
  detector/        the artifact (`maeday_jax.detectors.artifact`): score with it through
                   `configs/score.py` or `configs/evaluate.py --config.detector=<it>`
  training/        resumable training state (adaptation, pre-training, MALA stages)
  fit.json         what was fitted: method, shots and held-out normals, normal statistics,
                   threshold, time
  config.json      the resolved configuration
Rerunning the same command resumes an interrupted training and rewrites the artifact.
"""

from __future__ import annotations

import json
import time

import jax
import ml_collections

from maeday_jax import atomic_files, data, thresholds
from maeday_jax.detectors import artifact, fitting, registry
from maeday_jax.jobs import common, detector_choice
from maeday_jax.run_errors import RunFailed

THRESHOLD_METHODS = ("none", "percentile", "fixed")
ARTIFACT_DIR = "detector"


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fit job's settings (the detector's name first) before any work."""
  name = detector_choice.check(config)
  common.require(
    not detector_choice.is_path(name),
    "detector",
    f"{name!r}: the fit job fits a method by name (one of "
    f"{', '.join(registry.names())}), not an artifact.",
  )
  common.require(config.shots >= 0, "shots", f"must be >= 0 (0 = all), got {config.shots}.")
  common.require(
    config.heldout_normals >= 0, "heldout_normals", f"must be >= 0, got {config.heldout_normals}."
  )
  common.require(config.batch_size >= 1, "batch_size", f"must be >= 1, got {config.batch_size}.")
  common.require_divides_devices(config.batch_size, "batch_size")
  method = config.threshold.method
  common.require(
    method in THRESHOLD_METHODS,
    "threshold.method",
    f"{method!r} is not one of {', '.join(THRESHOLD_METHODS)} (a fit sees only normal images).",
  )
  common.require(
    0.0 <= config.threshold.percentile <= 100.0,
    "threshold.percentile",
    f"must be in [0, 100], got {config.threshold.percentile}.",
  )
  common.require(
    method != "percentile" or config.heldout_normals >= 1,
    "threshold.method",
    "'percentile' needs held-out normal images: set --config.heldout_normals >= 1.",
  )
  if method == "fixed":
    common.require(
      common.is_finite_number(config.threshold.value),
      "threshold.value",
      f"must be a finite number, got {config.threshold.value}.",
    )


def _threshold(config, detector) -> dict | None:
  """The threshold asked for; a percentile of the held-out normals' scores, which the fit
  computed already (`scoring.normal_statistics`)."""
  method = config.threshold.method
  if method == "fixed":
    return {"method": "fixed", "value": float(config.threshold.value)}
  if method != "percentile":
    return None
  scores = detector.heldout_scores
  if scores is None or len(scores) == 0:
    raise common.ConfigError(
      "--config.threshold.method=percentile: no held-out normal images were left (every "
      "training image is a shot); lower --config.shots."
    )
  value = thresholds.percentile_threshold(scores, config.threshold.percentile).value
  return {"method": "percentile", "percentile": float(config.threshold.percentile), "value": value}


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Fits `config.detector` and writes `<workdir>/detector/`; returns the fit record."""
  validate(config)
  started = time.perf_counter()
  categories = data.resolve_categories(config.data)
  detector = fitting.create(config)
  common.require(
    detector.trains_on_sources or len(categories) == 1,
    "data.categories",
    f"{detector.method} fits one category at a time (got {', '.join(categories)}); set "
    "--config.data.categories to one of them and fit each into its own --workdir.",
  )
  workdir = common.prepare_workdir(workdir, config)
  normals, record = fitting.normal_images(
    config, categories[0], workdir / "training", with_shots=detector.requires_shots()
  )
  try:
    fitting.fit_with_statistics(detector, normals, jax.random.key(config.seed))
  except FloatingPointError as e:  # Training diverged: the settings' to fix, no traceback.
    raise RunFailed(f"{detector.method} on {categories[0]}: {e}") from e
  threshold = _threshold(config, detector)
  path = artifact.save(detector, workdir / ARTIFACT_DIR, threshold=threshold, fit_record=record)
  summary = {
    "detector": detector.method,
    "description": detector.describe(),
    "artifact": str(path),
    "input_size": detector.input_size,
    "categories": categories,
    **record,
    "normal_statistics": detector.normal_statistics,
    "threshold": threshold,
    "seconds": round(time.perf_counter() - started, 2),
  }
  if jax.process_index() == 0:
    atomic_files.write_text(workdir / "fit.json", json.dumps(summary, indent=2, default=str))
    print(
      f"Fitted {detector.describe()} on {len(record['shots'])} shots of "
      f"{config.data.name}/{categories[0]} ({len(record['heldout'])} held-out normals) in "
      f"{summary['seconds']:.1f} s.\nDetector: {path}"
    )
  return summary

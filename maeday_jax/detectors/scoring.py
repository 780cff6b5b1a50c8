"""Scoring a few images with a detector (held-out normals, a notebook's arrays) and its
normal statistics; the batch step itself is `maeday_jax.batch_step`.

    maps, scores = scoring.score_images(detector, images)   # NumPy (N, S, S), (N,)
"""

from __future__ import annotations

import jax
import numpy as np

from maeday_jax import parallel
from maeday_jax.batch_step import (  # noqa: F401  (re-exported: the detector-facing API)
  compile_step,
  dispatch,
  is_transductive,
  score_arrays,
  score_local,
)
from maeday_jax.detectors.base import Detector


def score_images(detector: Detector, images: np.ndarray, mesh=None):
  """Maps and scores (NumPy) of a few images this process holds, e.g. held-out normals:
  compiled for this many images, run once."""
  mesh = parallel.data_mesh() if mesh is None else mesh
  per_device = jax.local_device_count()
  step = compile_step(detector, mesh, -(-max(len(images), 1) // per_device) * per_device)
  replicated = parallel.replicate(detector.state, mesh)
  return score_arrays(step, replicated, images, detector.scoring_key(), mesh)


def normal_statistics(detector: Detector, heldout: np.ndarray, mesh=None) -> dict | None:
  """Mean and standard deviation of the detector's maps and scores on held-out normal
  images (`ensemble.Standardization` fields), or None with fewer than two images or no
  spread. Keeps the images' scores in `detector.heldout_scores` (for a threshold)."""
  from maeday_jax import ensemble

  detector.heldout_scores = None
  if heldout is None or len(heldout) == 0:
    return None
  maps, scores = score_images(detector, heldout, mesh)
  detector.heldout_scores = np.asarray(scores)
  if len(heldout) < 2:
    return None
  norm = ensemble.Standardization.fit(maps, scores)
  return None if norm is None else norm.to_dict()

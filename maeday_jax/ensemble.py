"""Summing detectors: MAEDAY + PatchCore (the paper's best result) and two PatchCore banks.

The paper sums the models' pixel maps and image scores (spec §1, "Ensemble with
PatchCore"). Raw MAE squared errors and PatchCore feature distances differ in scale by
orders of magnitude, so a raw sum is decided by whichever model is larger; the default
standardises each model by the mean and standard deviation of its maps and scores on
held-out normal training images (never on test images or labels), which puts both on the
scale of their own normal variation. `normalize=False` gives the raw sum.

    norm = ensemble.Standardization.fit(heldout_maps, heldout_scores)
    score_fn = ensemble.sum_score_fn([maeday_fn, patchcore_fn], [norm_a, norm_b])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Standardization:
  """`(x - mean) / std` of one detector's pixel maps and of its image scores.

  Attributes:
    map_mean, map_std: over every pixel of the reference maps.
    score_mean, score_std: over the reference image scores.
  """

  map_mean: float = 0.0
  map_std: float = 1.0
  score_mean: float = 0.0
  score_std: float = 1.0

  @classmethod
  def fit(cls, maps: np.ndarray, scores: np.ndarray) -> Standardization | None:
    """Statistics of normal reference images; None when they cannot give a scale (fewer
    than two images, or no spread)."""
    maps, scores = np.asarray(maps, np.float64), np.asarray(scores, np.float64)
    if scores.size < 2 or not (np.isfinite(maps).all() and np.isfinite(scores).all()):
      return None
    map_std, score_std = float(maps.std()), float(scores.std())
    if not (map_std > 0 and score_std > 0):
      return None
    return cls(float(maps.mean()), map_std, float(scores.mean()), score_std)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


RAW = Standardization()  # The identity: the paper's raw sum.


def combine(outputs: Sequence[tuple], norms: Sequence[Standardization]) -> tuple:
  """The sum of standardised maps (B, H, W) and image scores (B,) of several detectors."""
  maps = sum((m - n.map_mean) / n.map_std for (m, _), n in zip(outputs, norms, strict=True))
  scores = sum((s - n.score_mean) / n.score_std for (_, s), n in zip(outputs, norms, strict=True))
  return maps, scores


def sum_score_fn(score_fns: Sequence[Callable], norms: Sequence[Standardization]) -> Callable:
  """A scoring function (`evaluation.Scoring.score_fn`) summing `score_fns`.

  Returns `score(replicated, images, ids, key)` where `replicated` is the tuple of each
  detector's replicated state; every detector sees the same images, so they must share
  one input size, and their maps one resolution.
  """
  score_fns, norms = tuple(score_fns), tuple(norms)

  def score(replicated, images, ids, key):
    outputs = [fn(r, images, ids, key) for fn, r in zip(score_fns, replicated, strict=True)]
    shapes = {tuple(m.shape) for m, _ in outputs}
    if len(shapes) > 1:
      raise ValueError(f"the detectors' maps differ in shape ({sorted(shapes)}); cannot sum.")
    return combine(outputs, norms)

  return score


__all__ = ["RAW", "Standardization", "combine", "sum_score_fn"]

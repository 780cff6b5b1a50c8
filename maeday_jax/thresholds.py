"""Turning anomaly scores into decisions, and putting two detectors' scores on one scale.

Three ways to pick a threshold (an image or pixel is anomalous when `score >= threshold`):

- `f1_threshold(scores, labels)`: the threshold reaching F1-max on labelled validation data.
  Optimistic if the same data is then used for evaluation; use it on a held-out split.
- `percentile_threshold(normal_scores, q)`: the q-th percentile of scores on normal reference
  images, for when no anomalies are available (zero/few-shot deployment): about (100 - q) %
  of normal images get flagged.
- `fixed_threshold(value)`: a value the user already trusts.

The `Threshold` records which method made it, so reports can say which one a job used.

Normalisation (`fit_normalization`, `normalize_scores`) maps scores of different detectors
(MAEDAY and PatchCore) to a common scale before they are summed in the ensemble (spec
section 1, "Ensemble with PatchCore"), with statistics of normal reference scores only,
never test labels: min-max to [0, 1] or standardisation.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from maeday_jax import metrics


@dataclasses.dataclass(frozen=True)
class Threshold:
  """A decision threshold and how it was chosen.

  Attributes:
    value: anomalous when `score >= value`.
    method: "f1", "percentile" or "fixed".
    details: what the method saw (e.g. {"f1": 0.91} or {"q": 99.0, "num_reference": 5}).
  """

  value: float
  method: str
  details: dict = dataclasses.field(default_factory=dict)

  def describe(self) -> str:
    """One line for logs and reports, e.g. 'percentile (q=99, num_reference=5): 0.731'."""
    extra = ", ".join(
      f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.details.items()
    )
    return f"{self.method}{f' ({extra})' if extra else ''}: {self.value:.6g}"

  def to_dict(self) -> dict:
    """JSON-ready form."""
    return {"value": float(self.value), "method": self.method, "details": dict(self.details)}


def f1_threshold(scores, labels) -> Threshold:
  """The threshold reaching F1-max on labelled scores (N,) with labels (N,) in {0, 1}.

  Among equally good thresholds the highest is taken (fewest alarms). Raises
  `metrics.MetricUndefinedError` when the labels hold only one class.
  """
  f1, value = metrics.best_f1_threshold(scores, labels)
  known = int(np.count_nonzero(np.asarray(labels) != -1))
  return Threshold(value, "f1", {"f1": f1, "num_labelled": known})


def percentile_threshold(normal_scores, q: float = 99.0) -> Threshold:
  """The q-th percentile (linear interpolation) of scores (any shape) of normal references."""
  normal_scores = np.asarray(normal_scores, dtype=np.float64).ravel()
  if normal_scores.size == 0:
    raise ValueError("percentile_threshold needs at least one normal reference score.")
  if not 0.0 <= q <= 100.0:
    raise ValueError(f"q must be a percentile in [0, 100], got {q}.")
  if not np.all(np.isfinite(normal_scores)):
    raise ValueError("normal reference scores contain NaN or infinite values.")
  value = float(np.percentile(normal_scores, q))
  return Threshold(value, "percentile", {"q": float(q), "num_reference": int(normal_scores.size)})


def fixed_threshold(value: float) -> Threshold:
  """A user-given threshold."""
  return Threshold(float(value), "fixed")


# ---------------------------------------------------------------------------------------------
# Normalisation for ensembling.


def minmax_normalize(x, lo: float, hi: float) -> np.ndarray:
  """(x - lo) / (hi - lo): the reference range maps to [0, 1] (values outside stay outside)."""
  if not hi > lo:
    raise ValueError(f"min-max normalisation needs hi > lo, got lo={lo}, hi={hi}.")
  return (np.asarray(x, dtype=np.float64) - lo) / (hi - lo)


def standardize(x, mean: float, std: float) -> np.ndarray:
  """(x - mean) / std."""
  if not std > 0:
    raise ValueError(f"standardisation needs std > 0, got {std}.")
  return (np.asarray(x, dtype=np.float64) - mean) / std


@dataclasses.dataclass(frozen=True)
class Normalization:
  """An affine map `(x - offset) / scale` fitted on normal reference scores.

  Attributes:
    method: "minmax" (offset = min, scale = max - min) or "standard" (mean, std).
    offset: subtracted first.
    scale: divided by next; always > 0.
  """

  method: str
  offset: float
  scale: float

  def __call__(self, x) -> np.ndarray:
    return (np.asarray(x, dtype=np.float64) - self.offset) / self.scale

  def to_dict(self) -> dict:
    """JSON-ready form."""
    return dataclasses.asdict(self)


def fit_normalization(reference, method: str = "minmax") -> Normalization:
  """Fits a normalisation on normal reference scores or maps (any shape, pooled)."""
  reference = np.asarray(reference, dtype=np.float64).ravel()
  if reference.size == 0:
    raise ValueError("normalisation needs at least one reference score.")
  if not np.all(np.isfinite(reference)):
    raise ValueError("reference scores contain NaN or infinite values.")
  if method == "minmax":
    offset, scale = float(reference.min()), float(reference.max() - reference.min())
  elif method == "standard":
    offset, scale = float(reference.mean()), float(reference.std())
  else:
    raise ValueError(f"method must be 'minmax' or 'standard', got {method!r}.")
  if not scale > 0:
    raise ValueError(
      f"reference scores are all equal ({offset:.6g}), so {method} normalisation has no scale; "
      "use more reference images, or pixel maps instead of one image score."
    )
  return Normalization(method, offset, scale)


def normalize_scores(scores, reference, method: str = "minmax") -> np.ndarray:
  """Scores normalised with statistics of the normal `reference` scores."""
  return fit_normalization(reference, method)(scores)

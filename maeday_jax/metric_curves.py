"""The maths shared by every metric: per-threshold count tables and the curves on them.

Every metric of `maeday_jax.metrics` is computed from one table (`ThresholdCounts`): for
each distinct score value, how many anomalous and normal samples have it (and, for
AUPRO, the sum of `1 / region size` over its anomalous pixels). Ties are handled like
scikit-learn does: a threshold never splits equal scores. The tables are built by
sorting scores through order-preserving uint64 keys (`order_keys`), which the pixel
accumulator (`maeday_jax.pixel_metrics`) also bins by dropping low bits.

Undefined cases (no anomalous or no normal samples, no ground-truth region) raise
`MetricUndefinedError`, a `ValueError` carrying the metric name and the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DEFAULT_FPR_LIMIT = 0.3
_SIGN = np.uint64(1 << 63)


class MetricUndefinedError(ValueError):
  """A metric has no value for this input (e.g. only one class); `reason` says why."""

  def __init__(self, metric: str, reason: str):
    super().__init__(f"{metric} is undefined: {reason}")
    self.metric = metric
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ThresholdCounts:
  """Per-threshold counts, highest threshold first (not cumulative).

  Attributes:
    thresholds: (T,) each distinct score value (or, once binned, each bin's lowest value);
      predicting `score >= thresholds[i]` gives the counts summed over `[:i + 1]`.
    positives: (T,) anomalous samples at each threshold.
    negatives: (T,) normal samples at each threshold.
    region_weights: (T,) sum of `1 / region size` over anomalous pixels (AUPRO), or None.
    num_regions: number of connected ground-truth regions (AUPRO), 0 for image data.
  """

  thresholds: np.ndarray
  positives: np.ndarray
  negatives: np.ndarray
  region_weights: np.ndarray | None = None
  num_regions: int = 0

  @property
  def num_positive(self) -> float:
    return float(self.positives.sum())

  @property
  def num_negative(self) -> float:
    return float(self.negatives.sum())


# ---------------------------------------------------------------------------------------------
# Curve maths on ThresholdCounts.


def require_both_classes(counts: ThresholdCounts, metric: str, unit: str) -> None:
  """Raises `MetricUndefinedError` unless `counts` holds both normal and anomalous `unit`s."""
  if counts.positives.size == 0:
    raise MetricUndefinedError(metric, f"there are no labelled {unit}s to evaluate.")
  if counts.num_positive == 0:
    raise MetricUndefinedError(
      metric, f"no anomalous {unit}s (label 1); it needs both normal and anomalous {unit}s."
    )
  if counts.num_negative == 0:
    raise MetricUndefinedError(
      metric, f"no normal {unit}s (label 0); it needs both normal and anomalous {unit}s."
    )


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
  # Written out because np.trapz was renamed in NumPy 2 and we support 1.26 too.
  return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def roc_points(counts: ThresholdCounts) -> tuple[np.ndarray, np.ndarray]:
  """False- and true-positive rates at each threshold, starting from (0, 0)."""
  fpr = np.concatenate([[0.0], np.cumsum(counts.negatives) / counts.num_negative])
  tpr = np.concatenate([[0.0], np.cumsum(counts.positives) / counts.num_positive])
  return fpr, tpr


def auroc_from_counts(
  counts: ThresholdCounts, metric: str = "auroc", unit: str = "sample"
) -> float:
  """Area under the ROC curve (trapezoids; equal scores form one diagonal step)."""
  require_both_classes(counts, metric, unit)
  fpr, tpr = roc_points(counts)
  return float(np.clip(_trapezoid(fpr, tpr), 0.0, 1.0))


def ap_from_counts(counts: ThresholdCounts, metric: str = "ap", unit: str = "sample") -> float:
  """Average precision, `sum_i (R_i - R_{i-1}) P_i` as scikit-learn defines it."""
  require_both_classes(counts, metric, unit)
  tps = np.cumsum(counts.positives)
  fps = np.cumsum(counts.negatives)
  precision = tps / (tps + fps)
  recall = tps / counts.num_positive
  return float(np.clip(np.sum(np.diff(recall, prepend=0.0) * precision), 0.0, 1.0))


def best_f1_from_counts(
  counts: ThresholdCounts, metric: str = "f1_max", unit: str = "sample"
) -> tuple[float, float]:
  """The best F1 over thresholds and the (highest) threshold reaching it."""
  require_both_classes(counts, metric, unit)
  tps = np.cumsum(counts.positives)
  fps = np.cumsum(counts.negatives)
  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P); never 0 / 0 since P > 0.
  f1 = 2.0 * tps / (tps + fps + counts.num_positive)
  best = int(np.argmax(f1))  # first maximum = highest threshold among equals
  return float(f1[best]), float(counts.thresholds[best])


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
  """Trapezoid area under y(x) for x in [x[0], x_max], interpolating y linearly at x_max.

  `x` must be non-decreasing. This is the MVTec AD reference `trapezoid(..., x_max)`.
  """
  x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
  full = x1 <= x_max
  area = float(np.sum((x1[full] - x0[full]) * (y0[full] + y1[full]) * 0.5))
  cross = np.flatnonzero((x0 < x_max) & (x1 > x_max))
  if cross.size:
    i = cross[0]
    y_at = y0[i] + (y1[i] - y0[i]) * (x_max - x0[i]) / (x1[i] - x0[i])
    area += 0.5 * (y0[i] + y_at) * (x_max - x0[i])
  return area


def pro_points(counts: ThresholdCounts) -> tuple[np.ndarray, np.ndarray]:
  """The MVTec PRO curve: (FPR, mean per-region overlap), from (0, 0) to (1, 1)."""
  fpr = np.minimum(np.cumsum(counts.negatives) / counts.num_negative, 1.0)
  pro = np.minimum(np.cumsum(counts.region_weights) / counts.num_regions, 1.0)
  return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def aupro_from_counts(counts: ThresholdCounts, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
  """Normalised area under the PRO curve up to `fpr_limit` (MVTec AD reference)."""
  if not 0.0 < fpr_limit <= 1.0:
    raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
  if counts.region_weights is None:
    raise ValueError("AUPRO needs region weights: build the counts from maps and masks.")
  if counts.positives.size == 0:
    raise MetricUndefinedError("aupro", "there are no pixels to evaluate.")
  if counts.num_regions == 0:
    raise MetricUndefinedError(
      "aupro", "no ground-truth anomaly region (all masks are empty at evaluation resolution)."
    )
  if counts.num_negative == 0:
    raise MetricUndefinedError(
      "aupro", "no normal pixels, so the false-positive rate is undefined."
    )
  fpr, pro = pro_points(counts)
  return float(np.clip(area_up_to(fpr, pro, fpr_limit) / fpr_limit, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Score tables: distinct (possibly binned) values with per-value sums.


def order_keys(values: np.ndarray) -> np.ndarray:
  """uint64 keys that sort like the float64 values (flip negatives, set the sign on positives)."""
  v = np.asarray(values, dtype=np.float64) + 0.0  # turns -0.0 into +0.0 so the zeros tie
  u = v.view(np.uint64)
  return np.where((u & _SIGN) != 0, ~u, u | _SIGN)


def key_values(keys: np.ndarray, shift: int) -> np.ndarray:
  """Lowest float64 value of each key's bin, keys shifted right by `shift` bits.

  Finite because shift <= 52: the sign and exponent bits are never dropped.
  """
  u = keys << np.uint64(shift)
  u = np.where((u & _SIGN) != 0, u ^ _SIGN, ~u)
  return u.view(np.float64)


def sum_by_key(keys: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted distinct keys and the column sums per key; columns is (C, n)."""
  uniq, inverse = np.unique(keys, return_inverse=True)
  sums = np.stack([np.bincount(inverse, weights=c, minlength=uniq.size) for c in columns])
  return uniq, sums


def check_finite(values: np.ndarray, what: str) -> None:
  """Raises ValueError, counting them, when `values` hold NaN or infinite entries."""
  if not np.all(np.isfinite(values)):
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    raise ValueError(f"{what} contain {bad} NaN or infinite value(s); fix the model output first.")

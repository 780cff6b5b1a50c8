"""Anomaly-detection metrics on NumPy arrays, as the field reports them (spec section 5).

Image level: AUROC, AP (area under the precision-recall curve, scikit-learn's step-wise
definition) and F1-max over the image scores. Pixel level: the same three over all pixels of
all test images pooled, plus AUPRO up to a false-positive rate of 0.3 exactly as in the MVTec
AD reference code (8-connected ground-truth regions, per-region overlap averaged over regions,
PRO-vs-FPR curve integrated to the limit with linear interpolation there, divided by it).

Every metric is computed from one table (`metric_curves.ThresholdCounts`): for each
distinct score value, how many anomalous and normal samples have it (and, for AUPRO, the
sum of `1 / region size` over its anomalous pixels). Ties are handled like scikit-learn
does: a threshold never splits equal scores.

The parts, each in its module: the tables and the curves on them in
`maeday_jax.metric_curves`; pixel metrics streamed through `PixelMetricAccumulator` in
`maeday_jax.pixel_metrics` (memory bounded by the number of distinct score values kept,
exact below that bound, binned with a reported AUROC error bound above it); the
image-level metrics here. Their public names are all importable from here.

Undefined cases (no anomalous or no normal samples, no ground-truth region) raise
`MetricUndefinedError`, a `ValueError` carrying the metric name and the reason, which the
report layer records as `null` plus a note. Constant scores are defined (AUROC 0.5).
"""

from __future__ import annotations

import numpy as np

from maeday_jax.metric_curves import (
  DEFAULT_FPR_LIMIT,
  MetricUndefinedError,
  ThresholdCounts,
  ap_from_counts,
  area_up_to,
  aupro_from_counts,
  auroc_from_counts,
  best_f1_from_counts,
  check_finite,
  key_values,
  order_keys,
  pro_points,
  require_both_classes,
  roc_points,
  sum_by_key,
)
from maeday_jax.pixel_metrics import (
  DEFAULT_MAX_DISTINCT,
  MIN_MAX_DISTINCT,
  PixelMetricAccumulator,
  region_weights,
)

# The public names, with those that moved to `metric_curves` and `pixel_metrics` (kept
# importable from here for existing callers).
__all__ = [
  "DEFAULT_FPR_LIMIT",
  "DEFAULT_MAX_DISTINCT",
  "METRIC_NAMES",
  "MIN_MAX_DISTINCT",
  "PIXEL_METRICS",
  "MetricUndefinedError",
  "PixelMetricAccumulator",
  "ThresholdCounts",
  "ap_from_counts",
  "area_up_to",
  "aupro_from_counts",
  "auroc_from_counts",
  "best_f1_from_counts",
  "best_f1_threshold",
  "f1_max",
  "image_ap",
  "image_auroc",
  "pro_points",
  "region_weights",
  "roc_curve",
  "roc_points",
  "vand_score",
]

METRIC_NAMES = (
  "image_auroc",
  "image_ap",
  "image_f1_max",
  "pixel_auroc",
  "pixel_ap",
  "pixel_f1_max",
  "aupro",
)
PIXEL_METRICS = METRIC_NAMES[3:]


def _image_counts(scores, labels) -> ThresholdCounts:
  """Counts table of image scores; labels -1 (unknown) are left out."""
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError(
      f"scores and labels must both have shape (N,), got {scores.shape} and {labels.shape}."
    )
  labels = labels.astype(np.int64)
  if not np.isin(labels, (-1, 0, 1)).all():
    raise ValueError(f"labels must be 0 (normal), 1 (anomalous) or -1 (unknown), got {labels}.")
  known = labels != -1
  scores, labels = scores[known], labels[known]
  check_finite(scores, "scores")
  keys, sums = sum_by_key(order_keys(scores), np.stack([labels == 1, labels == 0]).astype(float))
  return ThresholdCounts(key_values(keys, 0)[::-1], sums[0, ::-1], sums[1, ::-1])


# ---------------------------------------------------------------------------------------------
# Image-level metrics.


def image_auroc(scores, labels) -> float:
  """ROC-AUC of image scores (N,) against labels (N,) in {0, 1}; -1 entries are ignored."""
  return auroc_from_counts(_image_counts(scores, labels), "image_auroc", "image")


def image_ap(scores, labels) -> float:
  """Average precision of image scores (N,) against labels (N,); -1 entries are ignored."""
  return ap_from_counts(_image_counts(scores, labels), "image_ap", "image")


def f1_max(scores, labels) -> float:
  """Best F1 over all thresholds `score >= t`, for scores (N,) and labels (N,)."""
  return best_f1_from_counts(_image_counts(scores, labels), "image_f1_max", "image")[0]


def best_f1_threshold(scores, labels) -> tuple[float, float]:
  """(F1-max, threshold): predicting `score >= threshold` reaches F1-max on this data."""
  return best_f1_from_counts(_image_counts(scores, labels), "image_f1_max", "image")


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(fpr, tpr, thresholds) with one point per distinct score, from (0, 0) at +inf."""
  counts = _image_counts(scores, labels)
  require_both_classes(counts, "roc_curve", "image")
  fpr, tpr = roc_points(counts)
  return fpr, tpr, np.concatenate([[np.inf], counts.thresholds])


def vand_score(image_f1_max: float | None, pixel_f1_max: float | None) -> float | None:
  """The VAND 2023 challenge's score of one category: the harmonic mean of the image-level
  F1-max (classification) and the pixel-level F1-max (segmentation), 2ab / (a + b); 0 when
  both are 0, None when either is undefined. The challenge averages it over categories."""
  if image_f1_max is None or pixel_f1_max is None:
    return None
  a, b = float(image_f1_max), float(pixel_f1_max)
  return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)

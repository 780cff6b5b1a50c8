"""Anomaly-detection metrics on NumPy arrays, as the field reports them (spec section 5).

Image level: AUROC, AP (area under the precision-recall curve, scikit-learn's step-wise
definition) and F1-max over the image scores. Pixel level: the same three over all pixels of
all test images pooled, plus AUPRO up to a false-positive rate of 0.3 exactly as in the MVTec
AD reference code (8-connected ground-truth regions, per-region overlap averaged over regions,
PRO-vs-FPR curve integrated to the limit with linear interpolation there, divided by it).

Every metric is computed from one table: for each distinct score value, how many anomalous
and normal samples have it (and, for AUPRO, the sum of `1 / region size` over its anomalous
pixels). Ties are handled like scikit-learn does: a threshold never splits equal scores.

Pixel metrics stream through `PixelMetricAccumulator`, whose memory is bounded by the number
of distinct score values it keeps (`max_distinct`). Below that bound the result is exact.
Above it, neighbouring values are merged into bins by dropping low bits of their IEEE-754
representation (a relative resolution of 2**-(52 - shift)); the binned curves are then the
exact curves sampled at the bin edges, so F1-max can only come out lower, and AUROC moves by
at most `auroc_error_bound()` (reported with the result). Measured accuracy: with the
default bound, a 10 M pixel category (200 maps of 224 x 224) keeps ~1 M bins and every metric
is within 1e-6 of exact; the tests force 370 k distinct values into <= 2**16 or 2**18 bins and
check all four metrics within 1e-4 (F1-max, a maximum over single thresholds, is the most
sensitive; AUROC and AUPRO stay within ~1e-6). Bins have a fixed relative width, so they
are finest near zero: maps crossing zero (standardised ensembles) need more bins than the
positive reconstruction errors of MAEDAY for the same accuracy.

Undefined cases (no anomalous or no normal samples, no ground-truth region) raise
`MetricUndefinedError`, a `ValueError` carrying the metric name and the reason, which the
report layer records as `null` plus a note. Constant scores are defined (AUROC 0.5).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from maeday_jax.resizing import as_size, resize_maps_bilinear, resize_masks_bool

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

DEFAULT_FPR_LIMIT = 0.3
# 2**21 distinct values: a 64 MiB table (key + three float64 columns), about four times that
# at the peak of a merge. A 224 x 224 MVTec category (~10 M pixels) gets binned to <= 2**20
# bins, far finer than any difference the metrics can show.
DEFAULT_MAX_DISTINCT = 2**21
# Dropping 52 bits leaves sign + exponent (<= 4096 bins), so this floor always fits.
MIN_MAX_DISTINCT = 2**14
_MAX_SHIFT = 52
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


def _require_both_classes(counts: ThresholdCounts, metric: str, unit: str) -> None:
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
  _require_both_classes(counts, metric, unit)
  fpr, tpr = roc_points(counts)
  return float(np.clip(_trapezoid(fpr, tpr), 0.0, 1.0))


def ap_from_counts(counts: ThresholdCounts, metric: str = "ap", unit: str = "sample") -> float:
  """Average precision, `sum_i (R_i - R_{i-1}) P_i` as scikit-learn defines it."""
  _require_both_classes(counts, metric, unit)
  tps = np.cumsum(counts.positives)
  fps = np.cumsum(counts.negatives)
  precision = tps / (tps + fps)
  recall = tps / counts.num_positive
  return float(np.clip(np.sum(np.diff(recall, prepend=0.0) * precision), 0.0, 1.0))


def best_f1_from_counts(
  counts: ThresholdCounts, metric: str = "f1_max", unit: str = "sample"
) -> tuple[float, float]:
  """The best F1 over thresholds and the (highest) threshold reaching it."""
  _require_both_classes(counts, metric, unit)
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


def _order_keys(values: np.ndarray) -> np.ndarray:
  """uint64 keys that sort like the float64 values (flip negatives, set the sign on positives)."""
  v = np.asarray(values, dtype=np.float64) + 0.0  # turns -0.0 into +0.0 so the zeros tie
  u = v.view(np.uint64)
  return np.where((u & _SIGN) != 0, ~u, u | _SIGN)


def _key_values(keys: np.ndarray, shift: int) -> np.ndarray:
  """Lowest float64 value of each (shifted) key's bin; finite because shift <= 52."""
  u = keys << np.uint64(shift)
  u = np.where((u & _SIGN) != 0, u ^ _SIGN, ~u)
  return u.view(np.float64)


def _sum_by_key(keys: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted distinct keys and the column sums per key; columns is (C, n)."""
  uniq, inverse = np.unique(keys, return_inverse=True)
  sums = np.stack([np.bincount(inverse, weights=c, minlength=uniq.size) for c in columns])
  return uniq, sums


def _check_finite(values: np.ndarray, what: str) -> None:
  if not np.all(np.isfinite(values)):
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    raise ValueError(f"{what} contain {bad} NaN or infinite value(s); fix the model output first.")


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
  _check_finite(scores, "scores")
  keys, sums = _sum_by_key(_order_keys(scores), np.stack([labels == 1, labels == 0]).astype(float))
  return ThresholdCounts(_key_values(keys, 0)[::-1], sums[0, ::-1], sums[1, ::-1])


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
  _require_both_classes(counts, "roc_curve", "image")
  fpr, tpr = roc_points(counts)
  return fpr, tpr, np.concatenate([[np.inf], counts.thresholds])


# ---------------------------------------------------------------------------------------------
# Pixel-level metrics, streamed.

_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def region_weights(mask: np.ndarray) -> tuple[np.ndarray, int]:
  """Per-pixel `1 / size of its 8-connected region` (0 outside regions) and the region count."""
  labelled, num = ndimage.label(mask, structure=_EIGHT_CONNECTED)
  sizes = np.bincount(labelled.ravel(), minlength=num + 1).astype(np.float64)
  inverse = np.zeros_like(sizes)
  inverse[1:] = 1.0 / sizes[1:]
  return inverse[labelled], num


class PixelMetricAccumulator:
  """Pools the pixels of many (maps, masks) batches into a bounded table of distinct scores.

  Exact while at most `max_distinct` distinct score values have been seen; beyond that,
  values are merged into bins of relative width 2**-(52 - shift) (see the module docstring),
  and `is_exact` turns False. Masks are binarised (`> 0`) and resized with nearest neighbour
  to the maps' resolution (`resizing.resize_masks_bool`); maps are resized bilinearly
  (`resizing.resize_maps_bilinear`) only when `resolution` asks for it.

  Args:
    resolution: evaluation (H, W) or int; None evaluates at the maps' own resolution.
    max_distinct: most distinct values (or bins) kept; at least MIN_MAX_DISTINCT.
  """

  def __init__(self, resolution=None, max_distinct: int = DEFAULT_MAX_DISTINCT):
    if max_distinct < MIN_MAX_DISTINCT:
      raise ValueError(f"max_distinct must be at least {MIN_MAX_DISTINCT}, got {max_distinct}.")
    self.resolution = as_size(resolution)
    self.max_distinct = int(max_distinct)
    self.shift = 0
    self.num_images = 0
    self.num_regions = 0
    self._keys = np.zeros(0, dtype=np.uint64)
    self._sums = np.zeros((3, 0))  # rows: anomalous pixels, normal pixels, region weights
    self._pending: list[tuple[np.ndarray, np.ndarray]] = []
    self._pending_size = 0

  @property
  def is_exact(self) -> bool:
    """True while no two distinct score values have been merged."""
    return self.shift == 0

  @property
  def relative_resolution(self) -> float:
    """Relative width of a bin (0.0 while exact)."""
    return 0.0 if self.is_exact else 2.0 ** -(_MAX_SHIFT - self.shift)

  def add(self, maps, masks) -> None:
    """Adds anomaly maps (N, H, W) or (H, W) with their ground-truth masks (any size)."""
    maps = np.asarray(maps)
    if maps.dtype not in (np.float32, np.float64):
      maps = maps.astype(np.float64)
    masks = np.asarray(masks)
    if maps.ndim == 2:
      maps = maps[None]
    if masks.ndim == 2:
      masks = masks[None]
    if maps.ndim != 3 or masks.ndim != 3 or masks.shape[0] != maps.shape[0]:
      raise ValueError(
        f"maps and masks must be (N, H, W) with the same N, got {maps.shape} and {masks.shape}."
      )
    if self.resolution is not None and maps.shape[1:] != self.resolution:
      maps = resize_maps_bilinear(maps, self.resolution)
    if masks.shape[1:] != maps.shape[1:] or masks.dtype != bool:
      masks = resize_masks_bool(masks, maps.shape[1:])
    _check_finite(maps, "anomaly maps")

    weights = np.empty(maps.shape, dtype=np.float64)
    for i, mask in enumerate(masks):
      weights[i], num = region_weights(mask)
      self.num_regions += num
    self.num_images += maps.shape[0]

    keys = _order_keys(maps.ravel()) >> np.uint64(self.shift)
    flat = masks.ravel()
    columns = np.stack([flat, ~flat]).astype(np.float64)
    keys, sums = _sum_by_key(keys, np.concatenate([columns, weights.reshape(1, -1)]))
    self._pending.append((keys, sums))
    self._pending_size += keys.size
    if self._pending_size > self.max_distinct:
      self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
    sums = np.concatenate([self._sums] + [s for _, s in self._pending], axis=1)
    self._pending, self._pending_size = [], 0
    self._keys, self._sums = _sum_by_key(keys, sums)
    if self._keys.size > self.max_distinct:
      self._coarsen()

  def _coarsen(self) -> None:
    """Drops the fewest low key bits that bring the table to half of `max_distinct`."""
    target = self.max_distinct // 2

    def distinct_after(extra: int) -> int:
      shifted = self._keys >> np.uint64(extra)
      return 1 + int(np.count_nonzero(np.diff(shifted)))

    # The count falls monotonically with the shift: binary search for the smallest that fits.
    lo, hi = 1, _MAX_SHIFT - self.shift
    while lo < hi:
      mid = (lo + hi) // 2
      if distinct_after(mid) <= target:
        hi = mid
      else:
        lo = mid + 1
    shifted = self._keys >> np.uint64(lo)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(shifted)) + 1])
    self._keys = shifted[starts]
    self._sums = np.add.reduceat(self._sums, starts, axis=1)
    self.shift += lo

  def merge(self, other: PixelMetricAccumulator) -> None:
    """Adds the pixels pooled by `other` (e.g. another host's shard) to this accumulator.

    The merged table equals the one a single accumulator would hold after seeing both
    inputs, binned at the coarser of the two bin widths (exact when both are exact).
    """
    if other.resolution != self.resolution:
      raise ValueError(
        f"Cannot merge accumulators evaluating at {self.resolution} and {other.resolution}."
      )
    self._flush()
    other._flush()
    shift = max(self.shift, other.shift)
    keys = np.concatenate(
      [self._keys >> np.uint64(shift - self.shift), other._keys >> np.uint64(shift - other.shift)]
    )
    self._keys, self._sums = _sum_by_key(keys, np.concatenate([self._sums, other._sums], axis=1))
    self.shift = shift
    self.num_images += other.num_images
    self.num_regions += other.num_regions
    if self._keys.size > self.max_distinct:
      self._coarsen()

  def to_arrays(self) -> dict[str, np.ndarray]:
    """The accumulator's state as NumPy arrays (to send to other processes or save)."""
    self._flush()
    resolution = () if self.resolution is None else self.resolution
    return {
      "keys": self._keys,
      "sums": self._sums,
      "header": np.asarray([self.shift, self.num_images, self.num_regions, self.max_distinct]),
      "resolution": np.asarray(resolution, np.int64),
    }

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PixelMetricAccumulator:
    """The accumulator whose `to_arrays()` gave `arrays`."""
    shift, num_images, num_regions, max_distinct = (int(x) for x in arrays["header"])
    resolution = tuple(int(x) for x in arrays["resolution"]) or None
    acc = cls(resolution=resolution, max_distinct=max_distinct)
    acc.shift, acc.num_images, acc.num_regions = shift, num_images, num_regions
    acc._keys = np.asarray(arrays["keys"], np.uint64)
    acc._sums = np.asarray(arrays["sums"], np.float64).reshape(3, -1)
    return acc

  def counts(self) -> ThresholdCounts:
    """The table, highest threshold first."""
    self._flush()
    return ThresholdCounts(
      thresholds=_key_values(self._keys, self.shift)[::-1],
      positives=self._sums[0, ::-1],
      negatives=self._sums[1, ::-1],
      region_weights=self._sums[2, ::-1],
      num_regions=self.num_regions,
    )

  def auroc(self) -> float:
    """Pixel ROC-AUC over all pooled pixels."""
    return auroc_from_counts(self.counts(), "pixel_auroc", "pixel")

  def ap(self) -> float:
    """Pixel average precision over all pooled pixels."""
    return ap_from_counts(self.counts(), "pixel_ap", "pixel")

  def f1_max(self) -> float:
    """Pixel F1-max over all pooled pixels."""
    return best_f1_from_counts(self.counts(), "pixel_f1_max", "pixel")[0]

  def aupro(self, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Normalised AUPRO up to `fpr_limit` (MVTec AD reference)."""
    return aupro_from_counts(self.counts(), fpr_limit)

  def auroc_error_bound(self) -> float:
    """Largest possible |binned - exact| pixel AUROC: half the share of pairs sharing a bin."""
    if self.is_exact:
      return 0.0
    counts = self.counts()
    pairs = counts.num_positive * counts.num_negative
    if pairs == 0:
      return 0.0
    return float(0.5 * np.sum(counts.positives * counts.negatives) / pairs)

"""Metrics against independent computations: scikit-learn, and a direct AUPRO."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from maeday_jax import metrics


def pooled(maps, masks) -> metrics.PixelMetricAccumulator:
  """One accumulator holding all pixels of maps (N, H, W) and masks (N, H, W)."""
  accumulator = metrics.PixelMetricAccumulator()
  accumulator.add(maps, masks)
  return accumulator


def _sklearn_f1_max(labels, scores):
  precision, recall, _ = precision_recall_curve(labels, scores)
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = 2 * precision * recall / (precision + recall)
  return float(np.nanmax(f1))


def _direct_aupro(maps, masks, fpr_limit=0.3):
  """Threshold by threshold, as written in the MVTec AD paper: no tables, no cumsums."""
  regions = []
  for i, mask in enumerate(masks):
    labelled, num = ndimage.label(mask, structure=np.ones((3, 3)))
    regions += [(i, labelled == k) for k in range(1, num + 1)]
  normal = ~masks
  fprs, pros = [0.0], [0.0]
  for t in np.unique(maps)[::-1]:
    predicted = maps >= t
    fprs.append(predicted[normal].mean())
    pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
  fprs.append(1.0)
  pros.append(1.0)
  area = 0.0
  for x0, x1, y0, y1 in zip(fprs[:-1], fprs[1:], pros[:-1], pros[1:], strict=True):
    if x1 <= fpr_limit:
      area += (x1 - x0) * (y0 + y1) / 2
    elif x0 < fpr_limit:
      y_at = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
      area += (fpr_limit - x0) * (y0 + y_at) / 2
      break
  return area / fpr_limit


def _blob_data(rng, n=12, size=32, ties=True):
  """Maps with several blobs per anomalous image, scores rounded to create many ties."""
  yy, xx = np.mgrid[:size, :size]
  masks = np.zeros((n, size, size), dtype=bool)
  for i in range(n // 2):
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.integers(0, size, 2)
      masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(2, 7) ** 2
  maps = rng.normal(size=masks.shape) + 1.5 * masks
  if ties:
    maps = np.round(maps, 1)
  return maps.astype(np.float32), masks


# ---------------------------------------------------------------------------------------------
# Image level.


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_match_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 300)
  scores = np.round(rng.normal(size=300) + labels, 1)  # negatives and many ties
  assert metrics.image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), 1e-12)
  assert metrics.image_ap(scores, labels) == pytest.approx(
    average_precision_score(labels, scores), 1e-12
  )
  assert metrics.f1_max(scores, labels) == pytest.approx(_sklearn_f1_max(labels, scores), 1e-12)


def test_unknown_labels_are_ignored():
  scores = np.array([0.1, 0.9, 0.5, 0.7])
  labels = np.array([0, 1, -1, 0])
  assert metrics.image_auroc(scores, labels) == roc_auc_score([0, 1, 0], [0.1, 0.9, 0.7])


def test_constant_scores_are_defined():
  labels = np.array([0, 0, 1, 1, 1])
  scores = np.full(5, 3.0)
  assert metrics.image_auroc(scores, labels) == 0.5
  assert metrics.image_ap(scores, labels) == pytest.approx(0.6)  # the prevalence
  assert metrics.f1_max(scores, labels) == pytest.approx(2 * 0.6 / 1.6)


def test_positive_and_negative_zero_tie():
  assert metrics.image_auroc(np.array([0.0, -0.0]), np.array([1, 0])) == 0.5


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [-1, -1, -1]])
@pytest.mark.parametrize("fn", [metrics.image_auroc, metrics.image_ap, metrics.f1_max])
def test_one_class_raises_clear_error(fn, labels):
  with pytest.raises(metrics.MetricUndefinedError, match="image"):
    fn(np.array([0.1, 0.2, 0.3]), np.array(labels))


def test_bad_inputs_raise_value_error():
  with pytest.raises(ValueError, match="NaN"):
    metrics.image_auroc(np.array([0.1, np.nan]), np.array([0, 1]))
  with pytest.raises(ValueError, match="labels must be"):
    metrics.image_auroc(np.array([0.1, 0.2]), np.array([0, 2]))
  with pytest.raises(ValueError, match="shape"):
    metrics.image_auroc(np.array([0.1, 0.2]), np.array([0, 1, 1]))


def test_roc_curve_endpoints():
  fpr, tpr, thresholds = metrics.roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
  assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)


def test_best_f1_threshold_reproduces_f1():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, 100)
  scores = rng.normal(size=100) + labels
  f1, threshold = metrics.best_f1_threshold(scores, labels)
  predicted = scores >= threshold
  tp = np.sum(predicted & (labels == 1))
  assert f1 == pytest.approx(2 * tp / (predicted.sum() + labels.sum()))


# ---------------------------------------------------------------------------------------------
# Pixel level.


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn_pooled(seed):
  maps, masks = _blob_data(np.random.default_rng(seed))
  flat_maps, flat_masks = maps.ravel(), masks.ravel()
  assert pooled(maps, masks).auroc() == pytest.approx(roc_auc_score(flat_masks, flat_maps))
  assert pooled(maps, masks).ap() == pytest.approx(average_precision_score(flat_masks, flat_maps))
  assert pooled(maps, masks).f1_max() == pytest.approx(_sklearn_f1_max(flat_masks, flat_maps))


def test_aupro_hand_checked():
  # Region A = {(0,0), (1,1)}: diagonal neighbours, ONE region under 8-connectivity (size 2).
  # Region B = {(1,3)} (size 1). Normal pixels: 12 - 3 = 9.
  masks = np.array([[[1, 0, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]], dtype=bool)
  maps = np.array([[[0.9, 0.1, 0.2, 0.3], [0.1, 0.5, 0.5, 0.7], [0.0, 0.1, 0.2, 0.3]]])
  # t = 0.9: A half covered, B not     -> PRO (1/2 + 0) / 2 = 0.25, FPR 0
  # t = 0.7: B covered                 -> PRO (1/2 + 1) / 2 = 0.75, FPR 0
  # t = 0.5: A full; the tied normal   -> PRO 1,                    FPR 1/9
  # t = 0.3: two more normal pixels    -> PRO 1,                    FPR 3/9 (past 0.3)
  # Area to 0.3: (1/9) * (0.75 + 1) / 2 + (0.3 - 1/9) * 1 = 0.3 - 1/72; divided by 0.3:
  expected = (0.3 - 1 / 72) / 0.3  # = 0.953703...
  assert pooled(maps, masks).aupro() == pytest.approx(expected, abs=1e-12)
  # With 4-connectivity A would be two regions and the value (0.3 - 1/54) / 0.3 = 0.938...
  assert pooled(maps, masks).aupro() != pytest.approx((0.3 - 1 / 54) / 0.3, abs=1e-3)
  assert _direct_aupro(maps, masks) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_direct_threshold_by_threshold(seed, fpr_limit):
  maps, masks = _blob_data(np.random.default_rng(seed), n=6, size=24)
  assert maps[masks].size and len(np.unique(maps)) < maps.size  # multi-region and ties
  assert pooled(maps, masks).aupro(fpr_limit) == pytest.approx(
    _direct_aupro(maps, masks, fpr_limit), abs=1e-9
  )


def test_aupro_constant_map_follows_reference():
  # One threshold takes the curve straight to (1, 1): area 0.3 * 0.3 / 2, / 0.3 = 0.15.
  masks = np.zeros((2, 8, 8), dtype=bool)
  masks[0, 2:4, 2:4] = True
  assert pooled(np.ones((2, 8, 8)), masks).aupro() == pytest.approx(0.15)
  assert pooled(np.ones((2, 8, 8)), masks).auroc() == 0.5


def test_region_weights_use_eight_connectivity():
  mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]], dtype=bool)
  weights, num = metrics.region_weights(mask)
  assert num == 2
  assert weights[0, 0] == weights[1, 1] == 0.5 and weights[3, 0] == 0.5 and weights[2, 2] == 0


def test_empty_masks_raise_clear_error():
  maps, masks = np.random.default_rng(0).random((3, 8, 8)), np.zeros((3, 8, 8), dtype=bool)
  for name in ("auroc", "ap", "f1_max", "aupro"):
    with pytest.raises(metrics.MetricUndefinedError, match="anomal"):
      getattr(pooled(maps, masks), name)()


def test_streaming_batches_equal_one_shot():
  maps, masks = _blob_data(np.random.default_rng(5), n=10)
  acc = metrics.PixelMetricAccumulator()
  for i in range(0, 10, 3):
    acc.add(maps[i : i + 3], masks[i : i + 3])
  assert acc.is_exact and acc.num_images == 10
  assert acc.auroc() == pytest.approx(pooled(maps, masks).auroc(), abs=1e-12)
  assert acc.aupro() == pytest.approx(pooled(maps, masks).aupro(), abs=1e-12)


def test_masks_resized_nearest_to_maps():
  maps, masks = _blob_data(np.random.default_rng(6), n=4, size=16)
  big_masks = masks.repeat(4, axis=1).repeat(4, axis=2).astype(np.uint8) * 255
  assert pooled(maps, big_masks).auroc() == pooled(maps, masks).auroc()
  assert pooled(maps, big_masks).aupro() == pooled(maps, masks).aupro()


def test_resolution_option_resizes_both():
  maps, masks = _blob_data(np.random.default_rng(7), n=4, size=32)
  acc = metrics.PixelMetricAccumulator(resolution=16)
  acc.add(maps, masks)
  assert acc.counts().positives.sum() + acc.counts().negatives.sum() == 4 * 16 * 16


@pytest.mark.parametrize("positive_maps, max_distinct", [(False, 2**18), (True, 2**16)])
def test_bounded_memory_path_close_to_exact(positive_maps, max_distinct):
  rng = np.random.default_rng(8)
  maps, masks = _blob_data(rng, n=40, size=96, ties=False)  # ~370 k distinct values
  if positive_maps:  # reconstruction errors are positive; zero-crossing maps need more bins
    maps = (rng.gamma(2.0, 1.0, size=maps.shape) + 1.5 * masks).astype(np.float32)
  exact = metrics.PixelMetricAccumulator(max_distinct=2**22)
  binned = metrics.PixelMetricAccumulator(max_distinct=max_distinct)
  for i in range(0, 40, 8):
    exact.add(maps[i : i + 8], masks[i : i + 8])
    binned.add(maps[i : i + 8], masks[i : i + 8])
  assert exact.is_exact and not binned.is_exact
  assert binned.counts().thresholds.size <= max_distinct
  assert exact.auroc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
  assert abs(binned.auroc() - exact.auroc()) <= binned.auroc_error_bound() + 1e-12
  for name in ("auroc", "ap", "f1_max", "aupro"):
    assert abs(getattr(binned, name)() - getattr(exact, name)()) < 1e-4, name
  # Bins sample the exact curve, so the best F1 can only be missed, never exceeded.
  assert binned.f1_max() <= exact.f1_max() + 1e-12


def test_smallest_table_keeps_auroc_within_its_bound():
  maps, masks = _blob_data(np.random.default_rng(9), n=40, size=64, ties=False)
  binned = metrics.PixelMetricAccumulator(max_distinct=metrics.MIN_MAX_DISTINCT)
  binned.add(maps, masks)
  assert not binned.is_exact and binned.relative_resolution > 0
  exact = roc_auc_score(masks.ravel(), maps.ravel())
  assert abs(binned.auroc() - exact) <= binned.auroc_error_bound() < 1e-3
  with pytest.raises(ValueError, match="max_distinct"):
    metrics.PixelMetricAccumulator(max_distinct=100)


def test_merged_shards_equal_one_accumulator_over_everything():
  """Hosts pool their shards' tables: exact tables merge exactly; a coarsened shard
  coarsens the merge to its bins, still within the AUROC bound."""
  maps, masks = _blob_data(np.random.default_rng(10), n=12, size=48, ties=False)
  halves = [(maps[:5], masks[:5]), (maps[5:], masks[5:])]

  def merged(max_distinct_first):
    shards = [
      metrics.PixelMetricAccumulator(max_distinct=max_distinct_first),
      metrics.PixelMetricAccumulator(),
    ]
    for shard, (m, k) in zip(shards, halves, strict=True):
      shard.add(m, k)
    # As between hosts: through the array form.
    first, second = (metrics.PixelMetricAccumulator.from_arrays(s.to_arrays()) for s in shards)
    first.merge(second)
    return first

  exact = merged(metrics.DEFAULT_MAX_DISTINCT)
  assert exact.is_exact and exact.num_images == 12
  for name in ("auroc", "ap", "f1_max", "aupro"):
    assert getattr(exact, name)() == pytest.approx(
      getattr(pooled(maps, masks), name)(), abs=1e-12
    ), name
  assert exact.auroc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
  coarse = merged(metrics.MIN_MAX_DISTINCT)  # the first shard had to bin its values
  assert not coarse.is_exact
  assert abs(coarse.auroc() - exact.auroc()) <= coarse.auroc_error_bound() + 1e-12
  with pytest.raises(ValueError, match="Cannot merge"):
    coarse.merge(metrics.PixelMetricAccumulator(resolution=16))


def test_nan_maps_rejected():
  with pytest.raises(ValueError, match="NaN"):
    pooled(np.full((1, 4, 4), np.nan), np.ones((1, 4, 4))).auroc()

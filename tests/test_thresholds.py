"""Thresholds turn scores into decisions; normalisation puts detectors on one scale."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from maeday_jax import metrics, thresholds


def test_f1_threshold_reaches_f1_max():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 200)
  scores = np.round(rng.normal(size=200) + 1.2 * labels, 1)
  threshold = thresholds.f1_threshold(scores, labels)
  assert threshold.method == "f1"
  predicted = (scores >= threshold.value).astype(np.int64)
  assert set(np.unique(predicted)) <= {0, 1}
  assert f1_score(labels, predicted) == pytest.approx(metrics.f1_max(scores, labels))
  assert threshold.details["f1"] == pytest.approx(metrics.f1_max(scores, labels))


def test_f1_threshold_needs_both_classes():
  with pytest.raises(metrics.MetricUndefinedError):
    thresholds.f1_threshold(np.array([0.1, 0.2]), np.array([0, 0]))


def test_percentile_threshold():
  normal = np.arange(101, dtype=float)
  threshold = thresholds.percentile_threshold(normal, q=95)
  assert threshold.value == pytest.approx(95.0)
  assert threshold.method == "percentile" and threshold.details["num_reference"] == 101
  assert (normal >= threshold.value).sum() == 6  # 95 ... 100
  with pytest.raises(ValueError, match="percentile"):
    thresholds.percentile_threshold(normal, q=150)
  with pytest.raises(ValueError, match="at least one"):
    thresholds.percentile_threshold([])


def test_fixed_threshold():
  threshold = thresholds.fixed_threshold(0.5)
  assert threshold.to_dict() == {"value": 0.5, "method": "fixed", "details": {}}
  assert "fixed" in threshold.describe()
  scores = np.array([0.2, 0.5, 0.7])
  np.testing.assert_array_equal(scores >= threshold.value, [0, 1, 1])


def test_minmax_and_standardize():
  np.testing.assert_allclose(thresholds.minmax_normalize([1.0, 2.0, 3.0], 1.0, 3.0), [0, 0.5, 1])
  np.testing.assert_allclose(thresholds.standardize([1.0, 3.0], 2.0, 1.0), [-1, 1])
  with pytest.raises(ValueError):
    thresholds.minmax_normalize([1.0], 2.0, 2.0)
  with pytest.raises(ValueError):
    thresholds.standardize([1.0], 0.0, 0.0)


@pytest.mark.parametrize("method", ["minmax", "standard"])
def test_normalize_scores_uses_reference_statistics(method):
  rng = np.random.default_rng(2)
  reference = rng.normal(5.0, 2.0, size=50)
  normalized = thresholds.normalize_scores(reference, reference, method)
  if method == "minmax":
    assert normalized.min() == pytest.approx(0) and normalized.max() == pytest.approx(1)
  else:
    assert normalized.mean() == pytest.approx(0) and normalized.std() == pytest.approx(1)
  normalization = thresholds.fit_normalization(reference, method)
  np.testing.assert_allclose(normalization(reference[:3]), normalized[:3])
  assert normalization.to_dict()["method"] == method


def test_constant_reference_gives_clear_error():
  with pytest.raises(ValueError, match="all equal"):
    thresholds.fit_normalization(np.ones(4))
  with pytest.raises(ValueError, match="method"):
    thresholds.fit_normalization(np.arange(4.0), "rank")

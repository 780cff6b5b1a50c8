"""AnomalyDINO against NumPy written here: cosine distances to the rotated shots' tokens by
brute force, the top-1 % mean, the smoothed map (scipy), and the PCA foreground masks
(scikit-learn's PCA, scipy's morphology); the tokens themselves are the DINOv2 port's,
proven equal to PyTorch in tests/test_dinov2.py."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from sklearn.decomposition import PCA

from maeday_jax import defaults, detectors, foreground
from maeday_jax.detectors import scoring
from tests.test_patchcore import np_anomaly_maps

SIZE = 56  # The tiny DINOv2's 4 x 4 patch grid.


def _config(**fields) -> ml_collections.ConfigDict:
  config = defaults.fit_config("runlocal")
  config.detector = "anomalydino"
  for name, value in fields.items():
    config.anomalydino[name] = value
  return config


def _images(count: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(count, SIZE, SIZE, 3)).astype(np.float32)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_scores_and_maps_equal_a_brute_force_reference():
  shots, tests = _images(2, 0), _images(3, 1)
  detector = detectors.create(_config(rotations=(0, 90)))
  detector.fit(detectors.NormalImages.from_arrays(shots), None)
  maps, scores = scoring.score_images(detector, tests)

  net = detector._net

  def tokens(images):
    return np.asarray(net.patch_tokens(images, layers=(-1,), norm=True)[2])

  views = np.concatenate([shots, np.rot90(shots, 1, axes=(1, 2))])
  bank = _unit(tokens(views).reshape(-1, 48))
  assert bank.shape == (2 * 2 * 16, 48)
  test_tokens = _unit(tokens(tests))  # (3, 4, 4, 48)
  distances = 1.0 - np.max(test_tokens @ bank.T, axis=-1)  # Cosine distance, (3, 4, 4)
  expected_scores = [np.mean(np.sort(d.ravel())[-1:]) for d in distances]  # 1 % of 16 -> 1
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(maps, np_anomaly_maps(distances, (SIZE, SIZE)), rtol=1e-4, atol=1e-5)
  # A shot scores (almost) zero everywhere: each of its patches is in the bank.
  _, shot_scores = scoring.score_images(detector, shots)
  assert np.all(shot_scores < 1e-5)


def test_top_one_percent_mean_over_many_patches():
  """At 224 px (16 x 16 = 256 patches) the score is the mean of the 2 largest distances."""
  detector = detectors.create(_config(image_size=224, rotations=(0,)))
  detector.fit(detectors.NormalImages.from_arrays(_images(1, 2)[:, :, :, :]), None)
  tests = np.random.default_rng(3).normal(size=(2, 224, 224, 3)).astype(np.float32)
  maps, scores = scoring.score_images(detector, tests)
  bank = _unit(np.asarray(detector.state["bank"]))
  test_tokens = _unit(detector._net.patch_tokens(tests, layers=(-1,), norm=True)[2])
  distances = 1.0 - np.max(test_tokens.reshape(2, -1, 48) @ bank.T, axis=-1)
  expected = np.sort(distances, axis=1)[:, -2:].mean(axis=1)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)


def _np_foreground(features, threshold=10.0, border=0.2):
  """anomalib's `compute_background_masks` for one image, with scikit-learn and scipy."""
  rows, cols, _ = features.shape
  pc = PCA(n_components=1, svd_solver="full").fit_transform(features.reshape(rows * cols, -1))[:, 0]
  mask = (pc > threshold).reshape(rows, cols)
  y0, y1, x0, x1 = (
    int(rows * border),
    int(rows * (1 - border)),
    int(cols * border),
    int(cols * (1 - border)),
  )
  if mask[y0:y1, x0:x1].sum() <= mask[y0:y1, x0:x1].size * 0.35:
    mask = (-pc > threshold).reshape(rows, cols)
  window = np.ones((3, 3), bool)
  mask = ndimage.binary_dilation(mask, window)
  # OpenCV's closing: a dilation (outside = background), then an erosion (outside =
  # foreground, so the image border is not eroded).
  closed = ndimage.binary_dilation(mask, window, border_value=0)
  return ndimage.binary_erosion(closed, window, border_value=1)


@pytest.mark.parametrize("seed", range(4))
def test_foreground_mask_equals_the_pca_reference(seed):
  """An object (a blob of distinct tokens) on a plain background, with noise."""
  rng = np.random.default_rng(seed)
  rows, cols, dim = 12, 14, 32
  features = rng.normal(0, 1.0, (rows, cols, dim))
  blob = np.zeros((rows, cols), bool)
  blob[3 + seed % 3 : 9, 4 : 11 - seed % 2] = True
  features[blob] += rng.normal(0, 1, dim) * 8.0
  ours = np.asarray(foreground.foreground_mask(jax.numpy.asarray(features, np.float32)))
  np.testing.assert_array_equal(ours, _np_foreground(features))
  assert ours[blob].mean() > 0.9


# The tiny random DINOv2's tokens project to |pc| < 6, below the method's threshold of 10
# (real DINOv2 tokens reach it); the masking tests lower it so that masks are not empty,
# on 112 px images (8 x 8 patches: on 4 x 4 the dilation and closing cover everything).
LOW_THRESHOLD = 3.0
MASKED_SIZE = 112


def _masked_images(count: int, seed: int) -> np.ndarray:
  shape = (count, MASKED_SIZE, MASKED_SIZE, 3)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture
def low_threshold(monkeypatch):
  import functools

  masks = functools.partial(foreground.foreground_masks, threshold=LOW_THRESHOLD)
  monkeypatch.setattr(foreground, "foreground_masks", masks)


def test_masking_leaves_background_out_of_the_bank_and_the_scores(low_threshold):
  """The masks come from the tokens on their own scale (through the final norm, before the
  L2 normalisation the bank compares), as the method and anomalib compute them."""
  shots = _masked_images(1, 2)
  plain = detectors.create(_config(rotations=(0,), masking="false", image_size=MASKED_SIZE))
  plain.fit(detectors.NormalImages.from_arrays(shots), None)
  masked = detectors.create(_config(rotations=(0,), masking="true", image_size=MASKED_SIZE))
  masked.fit(detectors.NormalImages.from_arrays(shots), None)
  net = masked._net
  tokens = np.asarray(net.patch_tokens(shots, layers=(-1,), norm=True)[2], np.float64)[0]
  keep = _np_foreground(tokens, threshold=LOW_THRESHOLD).reshape(-1)
  assert 0 < keep.sum() < 64  # Some patches are background: the test can tell.
  np.testing.assert_allclose(
    masked.state["bank"], _unit(tokens.reshape(64, -1)[keep]), rtol=1e-4, atol=1e-6
  )
  assert plain.state["bank"].shape[0] == 64


@pytest.mark.parametrize(
  "dataset, category, masked",
  [
    ("mvtec_ad", "capsule", True),  # The method's masking test: objects on plain ground.
    ("mvtec_ad", "screw", True),
    ("mvtec_ad", "carpet", False),  # Textures and the rest: no masking.
    ("mvtec_ad", "transistor", False),
    ("visa", "pcb1", True),  # Every VisA category.
    ("folder", "line3", False),  # Other data: off unless asked.
    (None, None, False),
  ],
)
def test_auto_masking_follows_the_methods_choice_per_category(dataset, category, masked):
  from maeday_jax.detectors import anomalydino

  assert anomalydino.masking_for("auto", dataset, category) is masked
  assert anomalydino.masking_for("True", dataset, category) is True
  assert anomalydino.masking_for("false", dataset, category) is False


def test_auto_masking_is_chosen_at_fit_and_kept_by_the_artifact(tmp_path, low_threshold):
  shots = _masked_images(1, 2)
  data = ml_collections.ConfigDict({"name": "mvtec_ad"})
  # masking: auto, the default.
  detector = detectors.create(_config(rotations=(0,), image_size=MASKED_SIZE))
  normals = detectors.NormalImages.from_arrays(shots, data=data, category="hazelnut")
  detector.fit(normals, None)
  tokens = np.asarray(detector._net.patch_tokens(shots, layers=(-1,), norm=True)[2])[0]
  keep = _np_foreground(tokens.astype(np.float64), threshold=LOW_THRESHOLD).reshape(-1)
  assert 0 < keep.sum() < 64
  assert detector.state["bank"].shape[0] == keep.sum()  # Masked: hazelnut is an object.
  loaded = detectors.load(detectors.save(detector, tmp_path / "detector"))
  assert loaded.record()["masking"] is True
  images = _masked_images(2, 5)
  np.testing.assert_array_equal(
    scoring.score_images(loaded, images)[1], scoring.score_images(detector, images)[1]
  )


def test_a_size_that_is_not_a_multiple_of_14_is_rounded_and_said(caplog):
  config = _config(image_size=450)
  detectors.registry.get("anomalydino").validate(config)
  assert "images are resized to 448 px instead" in caplog.text
  assert detectors.create(config).input_size == 448
  assert detectors.create(_config(image_size=460)).input_size == 462  # The nearest.


def test_bad_settings_are_refused():
  from maeday_jax.config_errors import ConfigError

  with pytest.raises(ConfigError, match="smaller than one of DINOv2's 14-px patches"):
    detectors.registry.get("anomalydino").validate(_config(image_size=10))
  with pytest.raises(ConfigError, match="multiples of 90"):
    detectors.create(_config(rotations=(0, 45)))
  with pytest.raises(ConfigError, match="anomalydino.masking"):
    detectors.registry.get("anomalydino").validate(_config(masking="sometimes"))


def test_fits_after_the_first_compile_nothing(compile_counter):
  """A second fit, and a fit of another detector on the same DINOv2 (the next category of
  an evaluation), reuse the first fit's compiled token step."""
  from maeday_jax.detectors import anomalydino

  config = _config(rotations=(0, 90), masking="false")
  first, second = detectors.create(config), detectors.create(config)
  first.build()  # Their random weights' initialisers compile here (a checkpoint would not).
  second.build()
  anomalydino._compiled_tokens.cache_clear()  # Earlier tests compiled it for this model.
  before = len(compile_counter)
  first.fit(detectors.NormalImages.from_arrays(_images(2, 0)), None)
  compiled = len(compile_counter)
  assert compiled > before
  first.fit(detectors.NormalImages.from_arrays(_images(2, 1)), None)
  second.fit(detectors.NormalImages.from_arrays(_images(2, 2)), None)
  assert len(compile_counter) == compiled, compile_counter[compiled:]

"""MuSc-style mutual scoring against NumPy written here: the neighbourhood aggregation,
the nearest-patch distances to every other image of the group and the mean of the
smallest fraction, the re-scoring over the image graph, and the whole detector on a group
(padding rows left out), with the DINOv2 port's tokens (proven in tests/test_dinov2.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from maeday_jax import defaults, detectors
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import musc, scoring
from tests.test_patchcore import np_anomaly_maps


def np_aggregate(tokens, degree):
  """Average over the r x r window, zeros outside the image counted."""
  if degree == 1:
    return tokens
  pad = (degree - 1) // 2
  padded = np.pad(tokens, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out = np.zeros_like(tokens)
  for dy in range(degree):
    for dx in range(degree):
      out += padded[:, dy : dy + tokens.shape[1], dx : dx + tokens.shape[2]]
  return out / degree**2


def np_mutual(features, valid, fraction):
  features = np.asarray(features, np.float64)
  n = len(features)
  others = max(int(valid.sum()) - 1, 1)
  count = max(int(fraction * others), 1)
  out = np.zeros(features.shape[:2])
  for i in range(n):
    per_image = []
    for j in range(n):
      if j == i or not valid[j]:
        continue
      d = np.sqrt(((features[i][:, None, :] - features[j][None, :, :]) ** 2).sum(-1))
      per_image.append(d.min(axis=1))
    out[i] = np.sort(np.stack(per_image), axis=0)[:count].mean(axis=0)
  return out


def np_rescore(scores, tokens, ks):
  s = (scores - scores.min()) / (scores.max() - scores.min())
  unit = tokens / np.linalg.norm(tokens, axis=1, keepdims=True)
  w = unit @ unit.T
  results = []
  for k in ks:
    masked = np.zeros_like(w)
    for i in range(len(w)):
      top = np.argsort(-w[i], kind="stable")[:k]
      masked[i, top] = w[i, top]
    results.append((masked / masked.sum(axis=1, keepdims=True)) @ s)
  return np.mean(results, axis=0)


def test_aggregation_and_mutual_scores_equal_numpy():
  rng = np.random.default_rng(0)
  tokens = rng.normal(size=(5, 4, 3, 6)).astype(np.float32)
  for degree in (1, 3, 5):
    np.testing.assert_allclose(
      musc.aggregate(jnp.asarray(tokens), degree), np_aggregate(tokens, degree), atol=1e-6
    )
  features = tokens.reshape(5, 12, 6)
  valid = np.array([True, True, False, True, True])
  for fraction in (0.3, 0.5, 1.0):
    ours = np.asarray(musc.mutual_scores(jnp.asarray(features), jnp.asarray(valid), fraction))
    expected = np_mutual(features, valid, fraction)
    np.testing.assert_allclose(ours[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_rescoring_equals_numpy():
  rng = np.random.default_rng(1)
  scores = rng.uniform(0, 5, 6)
  tokens = rng.normal(size=(6, 8)) + 2.0  # Positive similarities, as class tokens have.
  valid = np.ones(6, bool)
  ours = musc.rescore(jnp.asarray(scores), jnp.asarray(tokens), jnp.asarray(valid), (2, 3))
  np.testing.assert_allclose(ours, np_rescore(scores, tokens, (2, 3)), rtol=1e-5, atol=1e-6)
  # Padding rows (any scores and tokens) change nothing.
  padded = musc.rescore(
    jnp.asarray(np.r_[scores, 100.0, -3.0]),
    jnp.asarray(np.r_[tokens, tokens[:1] * 5, rng.normal(size=(1, 8))]),
    jnp.asarray(np.r_[valid, False, False]),
    (2, 3),
  )
  np.testing.assert_allclose(padded[:6], ours, rtol=1e-6, atol=1e-7)


def _detector(**fields):
  config = defaults.fit_config("runlocal")
  for name, value in fields.items():
    config.musc[name] = value
  detector = detectors.create(config, "musc")
  detector.fit(detectors.NormalImages.from_arrays(np.zeros((0, 56, 56, 3))), None)
  return detector


def test_a_group_scores_like_the_numpy_pipeline():
  """Five images on 8 devices: three padding rows, which must not count. (The re-scoring
  is checked above: the tiny random DINOv2's class tokens are nearly parallel, so the
  image graph would rank on float noise.)"""
  detector = _detector(layers=(0, 2), degrees=(1, 3), rescore_k=())
  images = np.random.default_rng(2).normal(size=(5, 56, 56, 3)).astype(np.float32)
  maps, scores = scoring.score_images(detector, images)

  net = detector._net
  tokens = net.patch_tokens(images, layers=(0, 2))
  valid = np.ones(5, bool)
  total = 0.0
  for layer in (0, 2):
    t = np.asarray(tokens[layer], np.float64)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
    for degree in (1, 3):
      total = total + np_mutual(np_aggregate(t, degree).reshape(5, 16, -1), valid, 0.3)
  patch_scores = (total / 4).reshape(5, 4, 4)
  expected_maps = np_anomaly_maps(patch_scores, (56, 56))
  np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(scores, expected_maps.max(axis=(1, 2)), rtol=1e-4, atol=1e-5)


def test_a_group_of_one_and_bad_settings_are_refused():
  config = defaults.fit_config("runlocal")
  config.group_size = 1
  with pytest.raises(ConfigError, match="OTHER images of its group"):
    detectors.create(config, "musc")
  config = defaults.fit_config("runlocal")
  config.musc.degrees = (2,)
  with pytest.raises(ConfigError, match="odd neighbourhood sizes"):
    detectors.create(config, "musc")
  with pytest.raises(ConfigError, match="has layers 0 to 2"):
    _detector(layers=(0, 7))


def test_the_bulk_job_scores_a_group_like_the_library(tmp_path):
  """musc by name in the bulk job (zero-shot, no fit): one group of six images."""
  import csv

  from maeday_jax.data import images as image_io
  from maeday_jax.data.preprocess import preprocess_image
  from maeday_jax.jobs import score as score_job
  from tests import data_makers
  from tests.conftest import make_job_config

  folder = tmp_path / "images"
  names = [f"m{i}.png" for i in range(6)]
  for name in names:
    data_makers.write_image(folder / name)
  config = make_job_config("score", "runlocal", data={"path": str(folder), "num_workers": 2})
  config.detector, config.group_size, config.compilation_cache_dir = "musc", 8, ""
  score_job.run(config, tmp_path / "work")
  with open(tmp_path / "work" / "scores.csv", newline="") as f:
    bulk = {r["file"]: float(r["score"]) for r in csv.DictReader(f)}
  detector = _detector()
  images = np.stack([preprocess_image(image_io.read_image(folder / n), 56) for n in names])
  _, expected = scoring.score_images(detector, images)
  np.testing.assert_allclose([bulk[n] for n in names], expected, rtol=1e-4, atol=1e-6)

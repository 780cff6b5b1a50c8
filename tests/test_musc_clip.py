"""MuSc on CLIP's image tower: the tiny random `clip_test` through the detector against
NumPy (tests/test_musc.py's reference), with tokens and image embeddings taken from
`models.load` directly and CLIP's pixel normalisation applied here by hand; the artifact
round trip; the patch size of each CLIP in the input size; unknown backbones refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from maeday_jax import defaults, detectors, models
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import scoring
from maeday_jax.imagenet import IMAGENET_MEAN, IMAGENET_STD
from maeday_jax.models import clip
from tests.test_musc import np_aggregate, np_mutual, np_rescore
from tests.test_patchcore import np_anomaly_maps

LAYERS, DEGREES, KS = (0, 2), (1, 3), (2, 3)


def _config(**fields):
  config = defaults.fit_config("runlocal")
  config.musc.backbone = "clip_test"  # checkpoint 'random', 56 px: a 7 x 7 grid of 8 px.
  for name, value in fields.items():
    config.musc[name] = value
  return config


def _detector(**fields):
  detector = detectors.create(_config(**fields), "musc")
  detector.fit(detectors.NormalImages.from_arrays(np.zeros((0, 56, 56, 3))), None)
  return detector


@pytest.fixture(scope="module")
def tiny_clip():
  """The random clip_test the detectors build (the runlocal seed), loaded here directly."""
  return models.load("clip_test", "random", key=jax.random.key(_config().seed))


def _images(count=5, seed=0):
  """Distinct images (their own offsets and scales): CLIP's embeddings of pure noise are
  nearly parallel, and the re-scoring would rank on float noise."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(count, 56, 56, 3)) * rng.uniform(0.3, 1.5, (count, 1, 1, 1))
  return (images + rng.uniform(-1.5, 1.5, (count, 1, 1, 3))).astype(np.float32)


def test_clip_test_scores_a_group_like_the_numpy_pipeline(tiny_clip):
  """Five images on 8 devices (three padding rows, which must not count), re-scoring on."""
  detector = _detector(layers=LAYERS, degrees=DEGREES, rescore_k=KS)
  assert detector.describe() == "musc (clip_test)" and detector.input_size == 56
  assert set(detector.state) == {"clip"}
  images = _images()
  maps, scores = scoring.score_images(detector, images)

  net = tiny_clip
  pixels = images * IMAGENET_STD + IMAGENET_MEAN  # CLIP's normalisation, by hand.
  clip_images = ((pixels - np.array(clip.MEAN)) / np.array(clip.STD)).astype(np.float32)
  tokens = net.patch_tokens(clip_images, layers=LAYERS)
  valid = np.ones(5, bool)
  total = 0.0
  for layer in LAYERS:
    t = np.asarray(tokens[layer], np.float64)
    assert t.shape == (5, 7, 7, 32)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-5)
    for degree in DEGREES:
      total = total + np_mutual(np_aggregate(t, degree).reshape(5, 49, -1), valid, 0.3)
  patch_scores = (total / (len(LAYERS) * len(DEGREES))).reshape(5, 7, 7)
  expected_maps = np_anomaly_maps(patch_scores, (56, 56))
  np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-5)

  embeddings = np.asarray(net.encode_image(clip_images), np.float64)
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  similarity = np.sort(unit @ unit.T, axis=1)
  assert np.diff(similarity, axis=1).min() > 1e-3  # Distinct ranks: a meaningful check.
  expected = np_rescore(expected_maps.max(axis=(1, 2)), embeddings, KS)
  np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)


def test_the_artifact_round_trip_scores_alike(tmp_path):
  detector = _detector(layers=(1,), degrees=(1,), rescore_k=(2,))
  loaded = detectors.load(detectors.save(detector, tmp_path / "musc_clip"))
  record = loaded.record()
  assert record["weights"] is None  # Random weights: stored in the artifact.
  assert record["architecture"] == clip.architecture(detector._net.model)
  assert loaded.describe() == "musc (clip_test)" and set(loaded.state) == {"clip"}
  images = _images(4, seed=1)
  for ours, theirs in zip(
    scoring.score_images(loaded, images), scoring.score_images(detector, images), strict=True
  ):
    np.testing.assert_array_equal(ours, theirs)


def test_public_clip_weights_are_referenced_not_stored(monkeypatch, tiny_clip):
  """checkpoint '' on a public CLIP: the weights are the 'clip' kind's public file, left
  out of the saved state (no download here: `models.load` answers with clip_test)."""
  calls = []
  monkeypatch.setattr(models, "load", lambda *args, **kwargs: calls.append(args) or tiny_clip)
  detector = detectors.create(_config(backbone="clip_vit_l14_336", checkpoint=""), "musc")
  detector.build()
  assert calls == [("clip_vit_l14_336", "clip_vit_l14_336")]
  assert (detector._weights.kind, detector._weights.name) == ("clip", "clip_vit_l14_336")
  assert detector.saved_state() == {}


@pytest.mark.parametrize(
  "backbone, size, expected",
  [("clip_vit_b16", 450, 448), ("clip_vit_l14_336", 520, 518), ("clip_test", 58, 56)],
)
def test_the_input_is_a_multiple_of_each_clips_patch(backbone, size, expected, caplog):
  config = _config(backbone=backbone, image_size=size)
  detector = detectors.create(config, "musc")
  assert detector.input_size == expected
  assert f"{backbone}'s" in caplog.text and f"resized to {expected} px" in caplog.text
  with pytest.raises(ConfigError, match="smaller than one of CLIP clip_vit_b16's 16-px"):
    detectors.create(_config(backbone="clip_vit_b16", image_size=12), "musc")


@pytest.mark.parametrize("backbone", ["resnet18", "clip_vit_h14", "dinov2_vits16", "clip", ""])
def test_unknown_backbones_are_refused_with_the_choices(backbone):
  with pytest.raises(ConfigError) as error:
    detectors.create(_config(backbone=backbone), "musc")
  message = str(error.value)
  assert message.startswith("--config.musc.backbone:")
  for name in ("dinov2_vits14", "dinov2_test", "clip_vit_b16", "clip_vit_l14_336", "clip_test"):
    assert name in message


def test_clip_layers_out_of_range_are_refused(monkeypatch, tiny_clip):
  monkeypatch.setattr(models, "load", lambda *args, **kwargs: tiny_clip)
  with pytest.raises(ConfigError, match="this CLIP has layers 0 to 2"):
    _detector(layers=(0, 3))


def test_a_clip_with_the_dinov2_layers_is_told_the_papers(caplog):
  import logging

  from maeday_jax import defaults
  from maeday_jax.detectors import musc as musc_detector

  config = defaults.fit_config("runlocal")
  config.musc.update(backbone="clip_vit_l14_336", image_size=518, layers=(2, 5, 8, 11))
  with caplog.at_level(logging.WARNING, logger="maeday_jax"):
    musc_detector.Musc.validate(config)
  assert "--config.musc.layers=5,11,17,23" in caplog.text
  caplog.clear()
  config.musc.layers = (5, 11, 17, 23)
  with caplog.at_level(logging.WARNING, logger="maeday_jax"):
    musc_detector.Musc.validate(config)
  assert "musc.layers" not in caplog.text

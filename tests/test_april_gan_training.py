"""APRIL-GAN's adapter training: the 2 x 2 mosaic augmentation against hand-built
images and masks, its probability rule, and resuming from Orbax checkpoints (4 steps at
once equal 2 steps, a stop, and 2 more)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from maeday_jax import defaults, detectors, training
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import april_gan

SIZE = 32


def _box(image):
  """2 x 2 block means of an (S, S, ...) array, written out block by block."""
  half = image.shape[0] // 2
  out = np.zeros((half, half, *image.shape[2:]))
  for i in range(half):
    for j in range(half):
      out[i, j] = image[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].astype(np.float64).mean(axis=(0, 1))
  return out


def test_a_mosaics_quadrants_are_the_four_shrunk_images_and_masks():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 6, 6, 3)).astype(np.uint8)
  masks = np.zeros((4, 6, 6), np.uint8)
  masks[0] = 1  # Every block a defect.
  masks[1, 2:4, 2:4] = 1  # One whole block.
  masks[2, 0:2, 0:2] = [[1, 1], [1, 0]]  # 3 of 4 pixels: a defect.
  masks[3, 0:2, 0:2] = [[1, 1], [0, 0]]  # 2 of 4: not one.
  image, mask = april_gan.mosaic(images, masks)
  assert image.shape == (6, 6, 3) and image.dtype == np.uint8 and mask.shape == (6, 6)
  quadrants = [(slice(0, 3), slice(0, 3)), (slice(0, 3), slice(3, 6))]
  quadrants += [(slice(3, 6), slice(0, 3)), (slice(3, 6), slice(3, 6))]
  for k, (rows, cols) in enumerate(quadrants):
    np.testing.assert_array_equal(image[rows, cols], np.rint(_box(images[k])).astype(np.uint8))
  expected = np.zeros((6, 6), np.uint8)
  expected[0:3, 0:3] = 1
  expected[1, 4] = 1  # Image 1's block (1, 1), in the top-right quadrant.
  expected[3, 0] = 1  # Image 2's block (0, 0), bottom left; image 3's stays 0.
  np.testing.assert_array_equal(mask, expected)
  with pytest.raises(ValueError, match="even input size"):
    april_gan.mosaic(images[:, :5, :5], masks[:, :5, :5])


def test_mosaic_batches_follow_the_probability_and_the_categories():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (10, 4, 4, 3)).astype(np.uint8)
  masks = rng.integers(0, 2, (10, 4, 4)).astype(np.uint8)
  groups = np.array([0] * 5 + [1] * 5)
  shrunk = np.stack([np.rint(_box(x)).astype(np.uint8) for x in images])
  rows = np.arange(10)
  for step in range(20):  # Probability 0: never a mosaic.
    got, got_masks = april_gan.mosaic_batch(images, masks, groups, rows, 0.0, 3, step)
    np.testing.assert_array_equal(got, images)
    np.testing.assert_array_equal(got_masks, masks)
  got, _ = april_gan.mosaic_batch(images, masks, groups, rows, 1.0, 3, 0)
  for i, sample in enumerate(got):  # Probability 1: all, of the sample's own category.
    for rows_, cols in ((slice(0, 2), slice(0, 2)), (slice(2, 4), slice(2, 4))):
      sources = [j for j in range(10) if np.array_equal(shrunk[j], sample[rows_, cols])]
      assert sources and all(groups[j] == groups[i] for j in sources)
  again, _ = april_gan.mosaic_batch(images, masks, groups, rows, 1.0, 3, 0)
  np.testing.assert_array_equal(got, again)  # A function of (seed, step) only.
  half = [april_gan.mosaic_batch(images, masks, groups, rows, 0.5, 3, s)[0] for s in range(20)]
  mosaics = sum(int(not np.array_equal(h[i], images[i])) for h in half for i in range(10))
  assert 50 < mosaics < 150  # About half of 200 samples.


def test_the_mosaic_probability_rule_and_its_check():
  config = defaults.fit_config("runlocal")
  config.detector = "april_gan"
  section = config.april_gan
  assert section.mosaic_prob == -1.0 and april_gan.mosaic_probability(section) == 0.0
  section.aux_data.name = "mvtec_ad"
  assert april_gan.mosaic_probability(section) == pytest.approx(0.2)
  section.aux_data.name = "visa"
  assert april_gan.mosaic_probability(section) == 0.0
  section.mosaic_prob = 0.7
  assert april_gan.mosaic_probability(section) == pytest.approx(0.7)
  section.mosaic_prob = 1.5
  with pytest.raises(ConfigError, match="mosaic_prob"):
    detectors.create(config)
  section.mosaic_prob, section.checkpoint_every = 0.0, -1
  with pytest.raises(ConfigError, match="checkpoint_every"):
    detectors.create(config)


@pytest.fixture(scope="module")
def training_inputs():
  """A built tiny CLIP, 8 images with defect squares, per-image prompts, a section."""
  config = defaults.fit_config("runlocal")
  config.detector = "clip_zero_shot"
  detector = detectors.create(config)
  detector.fit(detectors.NormalImages.from_arrays(np.zeros((0, SIZE, SIZE, 3))), None)
  rng = np.random.default_rng(2)
  images = rng.integers(60, 180, (8, SIZE, SIZE, 3)).astype(np.uint8)
  masks = np.zeros((8, SIZE, SIZE), np.uint8)
  for i in range(1, 8, 2):
    images[i, 8:20, 6:22], masks[i, 8:20, 6:22] = 250, 1
  text = np.broadcast_to(np.asarray(detector.state["text"]), (8, *detector.state["text"].shape))
  section = defaults.fit_config("runlocal").april_gan
  section.update(steps=4, batch_size=4, checkpoint_every=2, mosaic_prob=0.5)
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  return detector, images, masks, text, section, groups


def _train(inputs, workdir, key=3):
  detector, images, masks, text, section, groups = inputs
  return april_gan.train_adapters(
    detector._net,
    (0, 1, 2),
    images,
    masks,
    text,
    detector.state["scale"],
    section,
    jax.random.key(key),
    groups=groups,
    workdir=workdir,
  )


def test_resumed_training_equals_an_uninterrupted_one(training_inputs, tmp_path, monkeypatch):
  whole, history, start = _train(training_inputs, tmp_path / "whole")
  assert start == 0 and len(history) == 4

  real_save = training.save

  def save_then_die(manager, step, state, key_data):
    real_save(manager, step, state, key_data)
    if step == 2:
      raise KeyboardInterrupt("killed after the step-2 checkpoint")

  monkeypatch.setattr(training, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    _train(training_inputs, tmp_path / "stopped")
  monkeypatch.undo()
  assert (tmp_path / "stopped" / april_gan.CHECKPOINT_DIR / "2").is_dir()
  resumed, history_2, start_2 = _train(training_inputs, tmp_path / "stopped")
  assert start_2 == 2 and history_2 == pytest.approx(history[2:], rel=0, abs=0)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, whole), resumed)
  # Another seed's checkpoints are refused, not mixed in.
  with pytest.raises(ValueError, match="different PRNG key"):
    _train(training_inputs, tmp_path / "stopped", key=4)


def test_a_fit_with_a_workdir_checkpoints_and_a_rerun_resumes(tmp_path):
  from tests.test_april_gan_export import _aux_folder

  config = defaults.fit_config("runlocal")
  config.detector = "april_gan"
  config.data.update(_aux_folder(tmp_path / "aux"))
  config.april_gan.update(steps=2, checkpoint_every=1)
  shots = np.zeros((1, SIZE, SIZE, 3), np.float32)
  records = []
  for _ in range(2):
    detector = detectors.create(config)
    normals = detectors.NormalImages.from_arrays(shots, data=config.data, workdir=tmp_path / "w")
    detector.fit(normals, None)
    records.append((detector.record()["training"], detector.state["adapters"]))
  assert (tmp_path / "w" / april_gan.CHECKPOINT_DIR / "2").is_dir()
  (first, adapters), (second, again) = records
  assert first["steps"] == 2 and "resumed_from_step" not in first and first["mosaic_prob"] == 0
  assert second["steps"] == 2 and second["resumed_from_step"] == 2  # Nothing left to train.
  jax.tree.map(np.testing.assert_array_equal, adapters, again)

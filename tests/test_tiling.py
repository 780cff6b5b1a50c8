"""Tiled scoring: tile layout, cutting and stitching against a NumPy reference written
here, a detector that scores each tile's mean, chunked passes equal to one pass, kNN image
scores over every tile, and the settings' refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maeday_jax import defaults, detectors, tiling
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import registry, scoring
from maeday_jax.jobs import detector_choice


def _reference_starts(length: int, tile: int, stride: int) -> list[int]:
  """Tile offsets, written independently: step until the next tile would overrun, then
  one tile flush with the border if the last one stopped short."""
  starts, at = [], 0
  while True:
    starts.append(min(at, max(length - tile, 0)))
    if at + tile >= length:
      break
    at += stride
  return sorted(set(starts))


@pytest.mark.parametrize(
  "length, tile, stride, expected",
  [
    (448, 224, 112, (0, 112, 224)),  # Even: the last tile ends at the border.
    (500, 224, 112, (0, 112, 224, 276)),  # Uneven: one more tile against the border.
    (224, 224, 112, (0,)),  # One tile.
    (50, 20, 20, (0, 20, 30)),  # No overlap but at the border.
    (7, 3, 1, (0, 1, 2, 3, 4)),
  ],
)
def test_tile_starts_cover_every_pixel(length, tile, stride, expected):
  assert tiling.tile_starts(length, tile, stride) == expected
  assert list(expected) == _reference_starts(length, tile, stride)


def _numpy_tiled_means(images: np.ndarray, tile: int, stride: int, combine: str) -> np.ndarray:
  """The stitched map of a detector whose map is each tile's mean, in plain NumPy."""
  batch, size = images.shape[:2]
  starts = _reference_starts(size, tile, stride)
  total = np.zeros((batch, size, size))
  count = np.zeros((size, size))
  best = np.full((batch, size, size), -np.inf)
  for y in starts:
    for x in starts:
      mean = images[:, y : y + tile, x : x + tile].mean(axis=(1, 2, 3))[:, None, None]
      total[:, y : y + tile, x : x + tile] += mean
      count[y : y + tile, x : x + tile] += 1
      best[:, y : y + tile, x : x + tile] = np.maximum(best[:, y : y + tile, x : x + tile], mean)
  return total / count if combine == "mean" else best


def _mean_score(state, images, ids, key):
  del state, ids, key
  means = images.mean(axis=(1, 2, 3))
  return jnp.broadcast_to(means[:, None, None], images.shape[:3]), means


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_stitched_tile_means_equal_the_numpy_reference(combine):
  images = np.random.default_rng(0).normal(size=(3, 50, 50, 3)).astype(np.float32)
  grid = tiling.Tiling(image_size=50, tile_size=20, stride=15, model_size=20, combine=combine)
  score = tiling.tiled(_mean_score, grid, tiling.tiles_per_pass(grid, 3), lambda m, s: s.max(1))
  ids = jnp.zeros((3, 2), jnp.uint32)
  maps, scores = jax.jit(score)({}, jnp.asarray(images), ids, None)
  expected = _numpy_tiled_means(images, 20, 15, combine)
  np.testing.assert_allclose(np.asarray(maps), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(scores), expected.max(axis=(1, 2)), rtol=1e-5)
  assert tiling.coverage(grid).min() >= 1


def test_chunked_passes_give_the_maps_of_one_pass():
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 64, 3)), jnp.float32)
  ids = jnp.arange(4, dtype=jnp.uint32).reshape(2, 2)
  seen = []

  def tile_ids_and_sizes(state, tiles, tile_ids, key):
    seen.append(tiles.shape[0])  # Traced once per distinct pass size.
    value = tiles.mean(axis=(1, 2, 3)) + tile_ids[:, 1].astype(jnp.float32) * 1e-10
    return jnp.broadcast_to(value[:, None, None], tiles.shape[:3]), value

  grid = tiling.Tiling(image_size=64, tile_size=32, stride=16, model_size=32, max_tiles=4)
  assert grid.count == 9 and tiling.tiles_per_pass(grid, 2) == 2  # 2 images x 2 tiles.
  chunked = tiling.tiled(tile_ids_and_sizes, grid, 2, lambda m, s: s.max(1))
  whole = tiling.tiled(tile_ids_and_sizes, grid, 9, lambda m, s: s.max(1))
  maps_a, scores_a = jax.jit(chunked)({}, images, ids, None)
  maps_b, scores_b = jax.jit(whole)({}, images, ids, None)
  assert seen == [4, 18]  # 5 passes of 2 x 2 tiles (one blank tile per image), then 2 x 9.
  np.testing.assert_array_equal(np.asarray(maps_a), np.asarray(maps_b))
  np.testing.assert_array_equal(np.asarray(scores_a), np.asarray(scores_b))


def test_tiles_of_one_image_get_distinct_ids_and_a_smaller_model_gets_resized_tiles():
  ids = jnp.asarray([[1, 2], [1, 3]], jnp.uint32)
  per_tile = np.asarray(tiling.tile_ids(ids, 4))
  assert per_tile.shape == (8, 2) and len({tuple(r) for r in per_tile}) == 8
  grid = tiling.Tiling(image_size=64, tile_size=32, stride=32, model_size=16)
  images = jnp.ones((1, 64, 64, 3))
  assert tiling.cut(images, grid).shape == (4, 16, 16, 3)
  assert tiling.stitch(jnp.ones((4, 16, 16)), grid).shape == (1, 64, 64)


def _config(method: str, **tiles) -> ml_collections.ConfigDict:
  config = defaults.fit_config("runlocal")
  config.detector = method
  config.tiling.update(tiles)
  return config


def test_a_tiled_patchcore_scores_the_most_anomalous_patch_of_any_tile():
  """kNN image scores over tiles: the tiled score of an image is the largest of its
  tiles' scores, each scored on its own as a whole image by the same detector."""
  config = _config("patchcore", mode="tiles", image_size=64, stride=16)
  detector = detectors.create(config, "patchcore")
  assert detector.read_size == 64 and detector.tiling.count == 9
  rng = np.random.default_rng(0)
  shots = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  normals = detectors.NormalImages.from_arrays(shots, shots[:0])
  detectors.fit_with_statistics(detector, normals, jax.random.key(0))
  # The bank holds the tiles' patches: 2 shots x 9 tiles x 16 patches, half kept.
  assert detector.state["bank"].shape[0] == 2 * 9 * 16 // 2
  images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
  maps, scores = scoring.score_images(detector, images)
  assert maps.shape == (2, 64, 64)
  untiled = detector.with_seed(0)  # The same fitted network and bank, scoring whole images.
  untiled.state = detector.state
  untiled.settings.tiling.mode = "none"
  assert untiled.read_size == 32
  grid = detector.tiling
  tiles = np.stack([images[:, y : y + 32, x : x + 32] for y, x in grid.positions], axis=1)
  tile_maps, tile_scores = scoring.score_images(untiled, tiles.reshape(-1, 32, 32, 3))
  np.testing.assert_allclose(scores, tile_scores.reshape(2, 9).max(axis=1), rtol=1e-5)
  expected = _stitch_numpy(tile_maps.reshape(2, 9, 32, 32), grid)
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-5)


def _stitch_numpy(tile_maps: np.ndarray, grid: tiling.Tiling) -> np.ndarray:
  total = np.zeros((tile_maps.shape[0], grid.image_size, grid.image_size))
  count = np.zeros((grid.image_size, grid.image_size))
  for i, (y, x) in enumerate(grid.positions):
    total[:, y : y + grid.tile_size, x : x + grid.tile_size] += tile_maps[:, i]
    count[y : y + grid.tile_size, x : x + grid.tile_size] += 1
  return total / count


@pytest.mark.parametrize(
  "method, fields, message",
  [
    ("patchcore", {"mode": "grid"}, "tiling.mode: 'grid' is not one of none, tiles"),
    ("patchcore", {"mode": "tiles", "combine": "median"}, "tiling.combine"),
    ("patchcore", {"mode": "tiles", "image_size": 16, "tile_size": 32}, "tiling.tile_size"),
    ("patchcore", {"mode": "tiles", "tile_size": 16, "stride": 20}, "tiling.stride"),
    ("patchcore", {"mode": "tiles", "max_tiles": 0}, "tiling.max_tiles"),
    ("musc", {"mode": "tiles"}, "scores images against each other"),
  ],
)
def test_bad_tiling_settings_are_refused_before_any_work(method, fields, message):
  config = _config(method, **fields)
  with pytest.raises(ConfigError, match=message):
    detector_choice.check(config)


def test_a_tile_larger_than_the_image_is_refused_when_the_detector_is_built():
  config = _config("patchcore", mode="tiles", image_size=16)  # Tile = input size, 32.
  registry.validate_tiling(registry.get("patchcore"), config)  # Depends on the detector.
  with pytest.raises(ConfigError, match="larger than the image"):
    _ = detectors.create(config, "patchcore").tiling


def test_tiles_and_the_whole_image_are_averaged_and_both_are_learned():
  grid = tiling.Tiling(image_size=64, tile_size=32, stride=32, model_size=32, with_global=True)
  images = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  score = tiling.tiled(_mean_score, grid, 4, lambda m, s: s.max(1))
  maps, scores = jax.jit(score)({}, jnp.asarray(images), jnp.zeros((2, 2), jnp.uint32), None)
  tiled = _numpy_tiled_means(images, 32, 32, "mean")
  # The whole image's map is constant (its mean, after the antialiased resize to 32 px).
  whole = np.asarray(jax.image.resize(images, (2, 32, 32, 3), "linear", antialias=True))
  whole = whole.mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(maps), (tiled + whole[:, None, None]) / 2, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), (tiled.max(axis=(1, 2)) + whole) / 2, rtol=1e-5)
  views = tiling.cut_arrays(images, grid)
  assert views.shape == (2 * 4 + 2, 32, 32, 3)  # Every image's 4 tiles, then the 2 images.
  np.testing.assert_allclose(views[0], images[0, :32, :32], rtol=1e-6)
  np.testing.assert_allclose(views[8:].mean(axis=(1, 2, 3)), whole, rtol=1e-5)

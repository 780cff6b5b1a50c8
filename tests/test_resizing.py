"""The four resizes of `maeday_jax.resizing` and where their arithmetics differ."""

import numpy as np

from maeday_jax import resizing


def test_sizes_are_pairs_of_ints():
  assert resizing.as_size(8) == (8, 8) and resizing.as_size(np.int64(8)) == (8, 8)
  assert resizing.as_size((4, 6)) == (4, 6) and resizing.as_size(None) is None


def test_pillow_and_numpy_nearest_differ_only_where_a_centre_is_a_boundary():
  mask = np.array([[0], [1]], np.uint8)  # 2 rows -> 7: row 3's centre is exactly 1.0
  pillow = resizing.resize_mask_pillow(mask, (7, 1))[:, 0]
  exact = resizing.resize_masks_bool(mask, (7, 1))[:, 0]
  assert pillow.dtype == np.uint8 and exact.dtype == bool
  np.testing.assert_array_equal(pillow, [0, 0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(exact, [0, 0, 0, 1, 1, 1, 1])
  big = np.kron(np.eye(4, dtype=np.uint8), np.ones((3, 3), np.uint8))  # 12 px, no ties at 4
  np.testing.assert_array_equal(resizing.resize_mask_pillow(big, 4), np.eye(4))
  np.testing.assert_array_equal(resizing.resize_masks_bool(big * 255, 4), np.eye(4, dtype=bool))


def test_maps_resize_batched_as_float32_and_same_size_is_unchanged():
  maps = np.random.default_rng(0).normal(size=(3, 5, 7))
  same = resizing.resize_maps_bilinear(maps, (5, 7))
  assert same.dtype == np.float32 and same.shape == (3, 5, 7)
  np.testing.assert_array_equal(same, maps.astype(np.float32))
  one = resizing.resize_maps_bilinear(maps[1], (10, 14))
  np.testing.assert_array_equal(resizing.resize_maps_bilinear(maps, (10, 14))[1], one)
  assert one.shape == (10, 14)

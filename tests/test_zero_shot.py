"""Zero-shot maps against an independent NumPy/SciPy computation, and data parallelism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from maeday_jax import blur, checkpoints, models, parallel, zero_shot


def _reference_maps(images, pred_multi, patch_size):
  """Spec §1 written directly: per mask, per channel blur of the squared error."""
  batch, num_masks, num_patches, _ = pred_multi.shape
  grid = int(round(num_patches**0.5))
  p = patch_size
  maps = np.zeros(images.shape[:3], np.float64)
  for b in range(batch):
    for n in range(num_masks):
      # Official unpatchify: 'nhwpqc->nchpwq'.
      recon = pred_multi[b, n].reshape(grid, grid, p, p, 3).transpose(0, 2, 1, 3, 4)
      recon = recon.reshape(grid * p, grid * p, 3)
      for c in range(3):
        err = (images[b, ..., c].astype(np.float64) - recon[..., c]) ** 2
        # scipy 'mirror' == numpy 'reflect' (edge pixel not repeated); radius 3 = 7 taps.
        maps[b] += ndimage.gaussian_filter(err, sigma=1.4, radius=3, mode="mirror")
    maps[b] /= num_masks
  return maps


@pytest.mark.parametrize("name", ["a", "b"])
def test_maps_match_reference_reconstructions(fixtures_dir, name):
  io = np.load(fixtures_dir / f"mae_ref_{name}_io.npz")
  model, params = checkpoints.load_mae(fixtures_dir / f"mae_ref_{name}.pth")
  maps = zero_shot.anomaly_maps_from_noise(model, params, io["images"], io["noise_multi"])
  expected = _reference_maps(io["images"], io["pred_multi"], int(io["patch_size"]))
  assert maps.shape == expected.shape
  np.testing.assert_allclose(maps, expected, rtol=1e-4, atol=1e-4 * expected.mean())
  scores = zero_shot.image_scores(maps)
  np.testing.assert_allclose(scores, expected.max(axis=(1, 2)), rtol=1e-4)


def test_blur_matches_scipy_with_reflect_borders():
  x = np.random.default_rng(0).normal(size=(3, 11, 9)).astype(np.float32)
  expected = ndimage.gaussian_filter(x, sigma=(0, 1.4, 1.4), radius=(0, 3, 3), mode="mirror")
  np.testing.assert_allclose(blur.gaussian_blur(jnp.asarray(x)), expected, atol=1e-5)
  # The kernel is the normalised 7-tap Gaussian.
  k = blur.gaussian_kernel_1d(7, 1.4)
  taps = np.exp(-0.5 * (np.arange(-3, 4) / 1.4) ** 2)
  np.testing.assert_allclose(k, taps / taps.sum(), rtol=1e-6)


def test_mask_chunks_give_the_same_maps(fixtures_dir):
  io = np.load(fixtures_dir / "mae_ref_a_io.npz")
  model, params = checkpoints.load_mae(fixtures_dir / "mae_ref_a.pth")
  whole = zero_shot.anomaly_maps_from_noise(model, params, io["images"], io["noise_multi"])
  chunked = zero_shot.anomaly_maps_from_noise(
    model, params, io["images"], io["noise_multi"], mask_batch_size=3
  )
  np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  model = models.create("test", num_heads=1)
  params = models.init_params(model, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  return model, params, images


def test_eight_devices_equal_one_device(tiny):
  assert jax.device_count() == 8, "tests expect 8 simulated CPU devices (see conftest.py)"
  model, params, images = tiny
  key = jax.random.key(3)
  ids = zero_shot.image_ids(np.asarray(images))
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.data_mesh(devices)
    score = zero_shot.make_scorer(model, mesh, num_masks=4)
    maps, scores = score(parallel.replicate(params, mesh), images, ids, key)
    if len(devices) == 8:
      assert len(maps.sharding.device_set) == 8
    results.append((np.asarray(maps), np.asarray(scores)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-5)


def test_padded_batch_scores_each_example_as_alone(tiny):
  """An image's maps depend only on its pixels, not on its batch, position or padding."""
  model, params, images = tiny
  key = jax.random.key(3)
  mesh = parallel.data_mesh()
  score = zero_shot.make_scorer(model, mesh, num_masks=4)
  replicated = parallel.replicate(params, mesh)
  full_maps, _ = score(replicated, images, zero_shot.image_ids(np.asarray(images)), key)
  # A last batch of 3 real images (5, 6, 7), in another order, padded with zeros.
  padded = jnp.concatenate([images[7:], images[5:7], jnp.zeros_like(images[:5])])
  part_maps, _ = score(replicated, padded, zero_shot.image_ids(np.asarray(padded)), key)
  np.testing.assert_allclose(part_maps[:3], np.asarray(full_maps)[[7, 5, 6]], rtol=1e-5, atol=1e-6)
  # Two copies of one image in a batch get the same masks, hence the same map.
  twins = jnp.concatenate([images[:1], images[:1], images[2:]])
  twin_maps, _ = score(replicated, twins, zero_shot.image_ids(np.asarray(twins)), key)
  np.testing.assert_array_equal(twin_maps[0], twin_maps[1])


def test_image_ids_are_the_sha256_of_the_name():
  import hashlib

  image = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
  ids = zero_shot.image_ids([image, "é.jpg"])
  assert ids.dtype == np.uint32 and ids.shape == (2, 2)
  for row, data in zip(ids, (image.tobytes(), "é.jpg".encode()), strict=True):
    digest = hashlib.sha256(data).digest()
    assert row.tolist() == [int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:8], "big")]


def test_key_api_is_deterministic_and_masks_differ(tiny):
  model, params, images = tiny
  a = zero_shot.anomaly_maps(model, params, images[:2], jax.random.key(0), num_masks=2)
  b = zero_shot.anomaly_maps(model, params, images[:2], jax.random.key(0), num_masks=2)
  c = zero_shot.anomaly_maps(model, params, images[:2], jax.random.key(1), num_masks=2)
  np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3

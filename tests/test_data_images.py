"""Decoding: every image mode becomes 8-bit RGB, masks become {0, 1}, bad files are named."""

import numpy as np
import pytest
from PIL import Image

from maeday_jax import data, imagenet, resizing
from maeday_jax.data import images
from tests import data_makers


@pytest.mark.parametrize("kind", ["rgb", "gray", "rgba", "palette", "gray16", "jpeg", "gray_jpeg"])
def test_read_image_converts_every_mode_to_rgb8(tmp_path, kind):
  path = tmp_path / f"x.{'jpg' if 'jpeg' in kind else 'png'}"
  want = data_makers.write_image(path, kind, (17, 23))
  got = data.read_image(path)
  assert got.dtype == np.uint8 and got.shape == (17, 23, 3)
  np.testing.assert_array_equal(got, want)


def test_read_image_handles_la_bilevel_and_float(tmp_path):
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
  np.testing.assert_array_equal(data.read_image(tmp_path / "la.png")[..., 1], gray)
  Image.fromarray(gray > 100).save(tmp_path / "bits.png")
  np.testing.assert_array_equal(data.read_image(tmp_path / "bits.png")[..., 2], (gray > 100) * 255)
  Image.fromarray(gray.astype(np.float32) / 255.0).save(tmp_path / "f.tiff")
  np.testing.assert_array_equal(data.read_image(tmp_path / "f.tiff")[..., 0], gray)


@pytest.mark.parametrize("kind", ["binary", "levels", "palette", "rgb"])
def test_read_mask_binarises(tmp_path, kind):
  want = data_makers.write_mask(tmp_path / "m.png", (9, 13), kind)
  got = data.read_mask(tmp_path / "m.png", expected_hw=(9, 13))
  assert got.dtype == np.uint8 and set(np.unique(got)) <= {0, 1}
  np.testing.assert_array_equal(got, want)


def test_mask_of_another_size_is_an_error_naming_it(tmp_path):
  data_makers.write_mask(tmp_path / "m.png", (9, 13))
  with pytest.raises(data.DataError, match=r"m\.png: mask is 9x13 \(HxW\) but its image is 13x9"):
    data.read_mask(tmp_path / "m.png", expected_hw=(13, 9))


@pytest.mark.parametrize(
  "write, reason",
  [
    (data_makers.write_truncated, "unreadable or truncated"),
    (data_makers.write_not_image, "not an image file"),
    (lambda p: p.write_bytes(b""), "empty file"),
  ],
)
def test_bad_files_raise_data_error_with_path_and_reason(tmp_path, write, reason):
  path = tmp_path / "bad.png"
  write(path)
  with pytest.raises(data.DataError, match=reason) as info:
    data.read_image(path)
  assert info.value.path == str(path) and str(path) in str(info.value)
  assert isinstance(info.value, ValueError)


def test_missing_file_is_a_data_error(tmp_path):
  with pytest.raises(data.DataError, match="cannot read file"):
    data.read_image(tmp_path / "nope.png")


def test_normalize_denormalize_round_trip():
  pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  x = imagenet.normalize(pixels)
  assert x.dtype == np.float32
  np.testing.assert_allclose(
    x[0, 0, 0], (pixels[0, 0, 0] / 255 - imagenet.IMAGENET_MEAN) / imagenet.IMAGENET_STD, rtol=1e-6
  )
  np.testing.assert_array_equal(imagenet.denormalize(x), pixels)


def test_normalize_keeps_jax_arrays_on_jax():
  import jax.numpy as jnp

  pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
  x = imagenet.normalize(jnp.asarray(pixels))
  assert isinstance(x, jnp.ndarray) and x.dtype == jnp.float32
  np.testing.assert_allclose(x, imagenet.normalize(pixels), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(imagenet.denormalize(x), pixels)


def test_resize_is_bilinear_for_images_and_nearest_for_masks():
  image = np.zeros((40, 30, 3), np.uint8)
  image[:, 15:] = 255
  resized = resizing.resize_image(image, 8)
  assert resized.shape == (8, 8, 3)
  assert 0 < resized[0, 3, 0] < 255 or 0 < resized[0, 4, 0] < 255  # blended at the edge
  mask = (image[..., 0] > 0).astype(np.uint8)
  assert set(np.unique(resizing.resize_mask_pillow(mask, 8))) == {0, 1}
  assert data.preprocess_image(image, 8).shape == (8, 8, 3)


def test_encode_png_round_trip():
  mask = (np.arange(20).reshape(4, 5) % 3 == 0).astype(np.uint8)
  np.testing.assert_array_equal(images.decode_mask(images.encode_png(mask)), mask)

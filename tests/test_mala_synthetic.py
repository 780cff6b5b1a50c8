"""MALA's synthetic anomalies: Perlin noise and masks, textures, foreground, DRAEM's blend."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maeday_jax.mala import synthetic

SIZE = 32
# Eight distinct constant colours (each channel differs between any two of them).
COLOURS = np.array(
  [[0.1 + 0.1 * i, 0.85 - 0.1 * i, 0.05 + 0.11 * ((3 * i) % 8)] for i in range(8)],
  np.float32,
)


def _constant_images(colours: np.ndarray, size: int = SIZE) -> jnp.ndarray:
  return jnp.asarray(np.broadcast_to(colours[:, None, None, :], (len(colours), size, size, 3)))


def _random_images(seed: int, batch: int = 8, size: int = SIZE) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, size, size, 3)), jnp.float32)


def _roughness(noise: np.ndarray) -> float:
  """Mean absolute difference of neighbouring pixels, both axes."""
  return float(np.abs(np.diff(noise, axis=0)).mean() + np.abs(np.diff(noise, axis=1)).mean())


# ---------------------------------------------------------------------------------------
# Perlin noise and masks.


def test_perlin_noise_range_lattice_zeros_and_smoothness():
  keys = jax.random.split(jax.random.key(0), 6)
  by_scale = {}
  for scale in (1, 4, 16):
    noise = np.stack(
      [np.asarray(synthetic.perlin_noise(k, (SIZE, SIZE), (scale, scale))) for k in keys]
    )
    assert noise.shape == (6, SIZE, SIZE) and noise.dtype == np.float32
    assert np.isfinite(noise).all()
    assert np.abs(noise).max() <= 1.0 + 1e-5  # Perlin's bound sqrt(1/2), times DRAEM's sqrt(2)
    assert noise.std() > 0.05  # not degenerate
    # Gradient noise is 0 on the lattice points, here every SIZE / scale pixels.
    step = SIZE // scale
    np.testing.assert_allclose(noise[:, ::step, ::step], 0.0, atol=1e-6)
    by_scale[scale] = np.mean([_roughness(n) for n in noise])
  assert by_scale[1] < by_scale[4] < by_scale[16]
  assert by_scale[16] > 3 * by_scale[1]


def test_perlin_noise_traced_scale_and_anisotropy():
  key = jax.random.key(3)
  traced = jax.jit(lambda s: synthetic.perlin_noise(key, (SIZE, SIZE), s))
  # A traced scale gives the same noise as the concrete one (same gradients, same formula).
  np.testing.assert_allclose(
    traced(jnp.array([2.0, 8.0])), synthetic.perlin_noise(key, (SIZE, SIZE), (2, 8)), atol=1e-6
  )
  # Scale (1, 16): smooth down the rows, rough along them.
  noise = np.asarray(traced(jnp.array([1.0, 16.0])))
  assert np.abs(np.diff(noise, axis=1)).mean() > 3 * np.abs(np.diff(noise, axis=0)).mean()
  with pytest.raises(ValueError, match="scale"):
    synthetic.perlin_noise(key, (SIZE, SIZE), (2, -1))


def test_perlin_mask_binary_thresholds_and_keys():
  keys = jax.random.split(jax.random.key(1), 16)
  masks = np.stack([np.asarray(synthetic.perlin_mask(k, (SIZE, SIZE))) for k in keys])
  assert masks.shape == (16, SIZE, SIZE) and masks.dtype == np.float32
  assert set(np.unique(masks)) <= {0.0, 1.0}
  assert 0.0 < masks.mean() < 0.5  # noise > 0.5 is a minority of the pixels
  # Noise lies in [-1, 1]: a threshold above 1 leaves nothing, one below -1 takes all.
  assert float(synthetic.perlin_mask(keys[0], (SIZE, SIZE), threshold=1.01).sum()) == 0
  assert float(synthetic.perlin_mask(keys[0], (SIZE, SIZE), threshold=-1.01).min()) == 1
  # Determinism, and different keys give different masks.
  np.testing.assert_array_equal(synthetic.perlin_mask(keys[2], (SIZE, SIZE)), masks[2])
  assert len({m.tobytes() for m in masks}) > 12
  # Scale 1 (exponents 0..0) blobs are much smoother than scale 16 ones.
  coarse = [synthetic.perlin_mask(k, (SIZE, SIZE), threshold=0.0, max_exp=0) for k in keys[:6]]
  fine = [
    synthetic.perlin_mask(k, (SIZE, SIZE), threshold=0.0, min_exp=4, max_exp=4) for k in keys[:6]
  ]
  assert np.mean([_roughness(np.asarray(m)) for m in fine]) > 4 * np.mean(
    [_roughness(np.asarray(m)) for m in coarse]
  )
  with pytest.raises(ValueError, match="min_exp"):
    synthetic.perlin_mask(keys[0], (SIZE, SIZE), min_exp=3, max_exp=2)


# ---------------------------------------------------------------------------------------
# Textures.


def test_other_image_indices_is_a_derangement():
  for b in (2, 3, 8):
    shifts = set()
    for seed in range(8):
      perm = np.asarray(synthetic.other_image_indices(jax.random.key(seed), b))
      assert sorted(perm.tolist()) == list(range(b))  # a permutation
      assert (perm != np.arange(b)).all()  # nobody is its own source
      shifts.add(int(perm[0]))
    assert shifts <= set(range(1, b))
    assert len(shifts) == 1 if b == 2 else len(shifts) > 1  # the shift is random
  with pytest.raises(ValueError, match="at least 2"):
    synthetic.other_image_indices(jax.random.key(0), 1)


def test_textures_from_images_never_uses_the_image_itself():
  images = _constant_images(COLOURS)
  for seed in range(3):
    key = jax.random.key(seed)
    textures = np.asarray(synthetic.textures_from_images(key, images, jitter=False))
    assert textures.shape == images.shape
    perm = np.asarray(synthetic.other_image_indices(key, len(COLOURS)))
    for b in range(len(COLOURS)):
      # A constant image stays constant under flips, zoom and rotation (reflected border).
      colour = textures[b].reshape(-1, 3)
      np.testing.assert_allclose(colour, np.broadcast_to(colour[0], colour.shape), atol=1e-5)
      distances = np.abs(COLOURS - colour[0]).max(axis=1)
      source = int(np.argmin(distances))
      assert distances[source] < 1e-5, "texture is not one of the batch's images"
      assert source != b, f"image {b} got its own content as texture"
      assert source == perm[b]  # the documented permutation
  with_jitter = np.asarray(synthetic.textures_from_images(jax.random.key(0), _random_images(0)))
  assert with_jitter.min() >= 0 and with_jitter.max() <= 1 and np.isfinite(with_jitter).all()
  with pytest.raises(ValueError, match="at least 2"):
    synthetic.textures_from_images(jax.random.key(0), images[:1])


def test_random_view_moves_content():
  # Without colour jitter, a texture is its source image seen through a random view
  # (flip / turn / zoom), which is not the identity.
  images = _random_images(9)
  key = jax.random.key(5)
  textures = np.asarray(synthetic.textures_from_images(key, images, jitter=False))
  sources = np.asarray(images)[np.asarray(synthetic.other_image_indices(key, 8))]
  moved = np.abs(textures - sources).reshape(8, -1).mean(axis=1)
  assert (moved > 0.05).sum() >= 6
  # Same pixel values, rearranged: the means stay close (bilinear resampling of a zoom).
  np.testing.assert_allclose(textures.mean(axis=(1, 2)), sources.mean(axis=(1, 2)), atol=0.1)


def test_procedural_textures_are_varied_and_in_range():
  textures = np.asarray(synthetic.procedural_textures(jax.random.key(0), 12, (SIZE, 40)))
  assert textures.shape == (12, SIZE, 40, 3) and textures.dtype == np.float32
  assert np.isfinite(textures).all() and textures.min() >= 0 and textures.max() <= 1
  # Varied: textures have structure, differ in colour, and are pairwise distinct.
  assert (textures.std(axis=(1, 2)).max(axis=-1) > 0.02).sum() >= 9
  assert textures.mean(axis=(1, 2)).std(axis=0).min() > 0.05
  flat = textures.reshape(12, -1)
  pair_diffs = np.abs(flat[:, None] - flat[None]).mean(axis=-1)
  assert pair_diffs[~np.eye(12, dtype=bool)].min() > 0.02
  again = synthetic.procedural_textures(jax.random.key(0), 12, (SIZE, 40))
  np.testing.assert_array_equal(again, textures)


def test_textures_from_bank_picks_bank_entries():
  bank_colours = COLOURS[:3]
  bank = _constant_images(bank_colours)
  textures = np.asarray(synthetic.textures_from_bank(jax.random.key(0), bank, 10, jitter=False))
  assert textures.shape == (10, SIZE, SIZE, 3)
  picked = set()
  for texture in textures:
    distances = np.abs(bank_colours - texture.reshape(-1, 3)[:, None]).max(axis=-1)
    assert distances.min(axis=1).max() < 1e-5
    picked.add(int(np.argmin(distances[0])))
  assert len(picked) >= 2
  # A uint8 bank is read as /255.
  bank_u8 = jnp.asarray(np.round(np.asarray(bank) * 255).astype(np.uint8))
  from_u8 = np.asarray(synthetic.textures_from_bank(jax.random.key(0), bank_u8, 10, jitter=False))
  np.testing.assert_allclose(from_u8, textures, atol=0.5 / 255 + 1e-5)


def _write(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_load_texture_folder_reads_crops_and_skips_bad_files(tmp_path, caplog):
  # 40 wide x 20 high: red outer quarters, green middle half; the centre square is green.
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, :10] = wide[:, 30:] = (255, 0, 0)
  wide[:, 10:30] = (0, 255, 0)
  _write(tmp_path / "a_wide.png", wide)
  _write(tmp_path / "sub" / "b_blue.bmp", np.full((30, 30, 3), (0, 0, 255), np.uint8))
  _write(tmp_path / "sub" / "deeper" / "c.JPG", np.full((50, 24, 3), 128, np.uint8))
  (tmp_path / "sub" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "._a_wide.png").write_bytes(b"macOS resource fork")

  with caplog.at_level(logging.WARNING, logger="maeday_jax"):
    bank = synthetic.load_texture_folder(tmp_path, 16)
  assert bank.shape == (3, 16, 16, 3) and bank.dtype == np.uint8
  np.testing.assert_array_equal(bank[0], np.broadcast_to([0, 255, 0], (16, 16, 3)))
  np.testing.assert_array_equal(bank[1], np.broadcast_to([0, 0, 255], (16, 16, 3)))
  assert np.abs(bank[2].astype(int) - 128).max() <= 2  # JPEG is lossy
  assert "corrupt.jpg" in caplog.text
  assert "._a_wide" not in caplog.text  # hidden files are not even tried

  rect = synthetic.load_texture_folder(tmp_path, (8, 12))
  assert rect.shape == (3, 8, 12, 3)
  subset = synthetic.load_texture_folder(tmp_path, 16, max_images=2)
  assert subset.shape == (2, 16, 16, 3)


def test_load_texture_folder_errors_name_the_folder(tmp_path):
  missing = tmp_path / "no_such_dtd"
  with pytest.raises(ValueError, match="no_such_dtd"):
    synthetic.load_texture_folder(missing, 16)
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  (empty / "readme.txt").write_text("nothing")
  with pytest.raises(ValueError, match="empty_dir.*no image"):
    synthetic.load_texture_folder(empty, 16)
  broken = tmp_path / "broken_dir"
  broken.mkdir()
  (broken / "x.png").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="broken_dir.*no readable"):
    synthetic.load_texture_folder(broken, 16)


# ---------------------------------------------------------------------------------------
# Foreground.


def test_foreground_mask_finds_a_centred_object():
  images = np.full((2, SIZE, SIZE, 3), 0.2, np.float32)
  images[0, 10:20, 12:22] = 0.8  # a bright square
  images[1] += np.random.default_rng(0).normal(0, 0.01, images[1].shape).astype(np.float32)
  fg = np.asarray(synthetic.foreground_mask(jnp.asarray(images), 0.1, dilation=2))
  assert fg.shape == (2, SIZE, SIZE) and set(np.unique(fg)) <= {0.0, 1.0}
  expected = np.zeros((SIZE, SIZE), np.float32)
  # With the 3x3 mean, a pixel beside the square's edge sees 3 of 9 square pixels
  # (|0.4 - 0.2| > 0.1): the square grows by one pixel, dilation 2 adds two more.
  expected[8:22, 10:24] = 1
  assert (fg[0] >= expected).all()
  assert fg[0][:5].sum() == 0 and fg[0][:, :7].sum() == 0 and fg[0][25:].sum() == 0
  assert fg[1].sum() == 0  # only noise: no foreground


# ---------------------------------------------------------------------------------------
# The blend and `synthesize`.


def test_blend_formula_by_hand():
  images = jnp.full((1, 1, 3, 1), 0.5)
  textures = jnp.full((1, 1, 3, 1), 1.0)
  masks = jnp.array([[[0.0, 1.0, 0.5]]])
  out = synthetic.blend(images, textures, masks, jnp.array([0.25]))
  # m=0: 0.5; m=1: 0.75 * 1 + 0.25 * 0.5 = 0.875; m=0.5: 0.25 + 0.375 + 0.0625 = 0.6875.
  np.testing.assert_allclose(out[0, 0, :, 0], [0.5, 0.875, 0.6875], atol=1e-6)
  # Outside the mask the image is kept exactly, even for a non-finite texture.
  out = synthetic.blend(images, jnp.full_like(textures, jnp.nan), masks, jnp.array([0.25]))
  assert out[0, 0, 0, 0] == 0.5


def test_synthesize_blend_inside_and_identity_outside():
  images, textures = _random_images(0), _random_images(1)
  out, masks, beta = synthetic.synthesize(
    jax.random.key(0), images, textures, anomaly_prob=1.0, beta_range=(0.1, 0.6), return_beta=True
  )
  out, masks, beta = np.asarray(out), np.asarray(masks), np.asarray(beta)
  images, textures = np.asarray(images), np.asarray(textures)
  assert out.shape == images.shape and out.dtype == np.float32
  assert masks.shape == images.shape[:3] and masks.dtype == np.float32
  assert set(np.unique(masks)) <= {0.0, 1.0}
  assert beta.shape == (8,) and (beta >= 0.1).all() and (beta <= 0.6).all()
  assert len(np.unique(beta)) == 8
  outside = masks == 0
  np.testing.assert_array_equal(out[outside], images[outside])  # exactly unchanged
  b = np.broadcast_to(beta[:, None, None, None], images.shape)[masks == 1]
  expected = (1 - b) * textures[masks == 1] + b * images[masks == 1]
  assert (masks == 1).sum() > 0
  np.testing.assert_allclose(out[masks == 1], expected, atol=1e-6)
  # anomaly_prob=1: most images get an anomaly (a few masks may be empty by chance).
  assert (masks.reshape(8, -1).sum(axis=1) > 0).sum() >= 6


def test_synthesize_is_deterministic_from_the_key():
  images, textures = _random_images(2), _random_images(3)
  first = synthetic.synthesize(jax.random.key(7), images, textures)
  again = synthetic.synthesize(jax.random.key(7), images, textures)
  other = synthetic.synthesize(jax.random.key(8), images, textures)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[1], other[1])


def test_synthesize_anomaly_prob_zero_and_half():
  images, textures = _random_images(4), _random_images(5)
  out, masks = synthetic.synthesize(jax.random.key(1), images, textures, anomaly_prob=0.0)
  assert float(jnp.abs(masks).sum()) == 0
  np.testing.assert_array_equal(out, images)
  out, masks = synthetic.synthesize(jax.random.key(1), images, textures)
  anomalous = np.asarray(masks).reshape(8, -1).sum(axis=1) > 0
  assert 1 <= anomalous.sum() <= 7
  changed = np.abs(np.asarray(out) - np.asarray(images)).reshape(8, -1).max(axis=1) > 0
  np.testing.assert_array_equal(changed, anomalous)  # normal images are untouched


def test_synthesize_respects_the_foreground():
  images, textures = _random_images(6), _random_images(7)
  fg = np.zeros((8, SIZE, SIZE), np.float32)
  fg[:, :, : SIZE // 2] = 1  # left half only
  out, masks = synthetic.synthesize(
    jax.random.key(2), images, textures, foreground=jnp.asarray(fg), anomaly_prob=1.0
  )
  masks = np.asarray(masks)
  assert masks[:, :, SIZE // 2 :].sum() == 0
  assert masks.sum() > 0
  np.testing.assert_array_equal(
    np.asarray(out)[:, :, SIZE // 2 :], np.asarray(images)[:, :, SIZE // 2 :]
  )
  # An empty foreground: no anomaly anywhere, images unchanged.
  out, masks = synthetic.synthesize(
    jax.random.key(2), images, textures, foreground=jnp.zeros((8, SIZE, SIZE)), anomaly_prob=1.0
  )
  assert float(jnp.abs(masks).sum()) == 0
  np.testing.assert_array_equal(out, images)
  with pytest.raises(ValueError, match="foreground"):
    synthetic.synthesize(jax.random.key(2), images, textures, foreground=jnp.zeros((8, SIZE)))


def test_synthesize_runs_under_an_outer_jit():
  images = _random_images(8)
  textures = _random_images(10)

  @jax.jit
  def step(key, images, textures):
    fg = synthetic.foreground_mask(images, 0.0)  # threshold 0: everything is foreground
    return synthetic.synthesize(key, images, textures, foreground=fg, anomaly_prob=1.0)

  out, masks = step(jax.random.key(0), images, textures)
  assert out.shape == images.shape and masks.shape == (8, SIZE, SIZE)
  assert np.isfinite(np.asarray(out)).all() and float(masks.sum()) > 0
  outside = np.asarray(masks) == 0
  np.testing.assert_array_equal(np.asarray(out)[outside], np.asarray(images)[outside])
  # The same draw as without the outer jit (the foreground is all ones here).
  direct = synthetic.synthesize(
    jax.random.key(0), images, textures, foreground=jnp.ones((8, SIZE, SIZE)), anomaly_prob=1.0
  )
  np.testing.assert_allclose(out, direct[0], atol=1e-6)
  np.testing.assert_array_equal(masks, direct[1])
  with pytest.raises(ValueError, match="beta_range"):
    synthetic.synthesize(jax.random.key(0), images, images, beta_range=(0.5, 0.2))
  with pytest.raises(ValueError, match="anomaly_prob"):
    synthetic.synthesize(jax.random.key(0), images, images, anomaly_prob=1.5)

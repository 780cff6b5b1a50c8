"""PatchCore against independent NumPy / SciPy / scikit-learn references.

The backbone is a small stand-in with the ResNet interface
(`apply(variables, images, stages=...)` -> {stage: NHWC}), layer2 at stride 8 and layer3
at stride 16.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from sklearn import random_projection

from maeday_jax import parallel, patchcore


class StandInBackbone(nn.Module):
  """Two strided convolutions: "layer2" (stride 8, 8 channels), "layer3" (stride 16, 16)."""

  @nn.compact
  def __call__(self, images, stages=("layer2", "layer3")):
    layer2 = nn.Conv(8, (3, 3), strides=(8, 8), name="conv2")(images)
    layer3 = nn.Conv(16, (3, 3), strides=(2, 2), name="conv3")(jnp.tanh(layer2))
    features = {"layer2": layer2, "layer3": layer3}
    return {name: features[name] for name in stages}


@pytest.fixture(scope="module")
def backbone():
  """The stand-in and its weights, drawn with NumPy (`model.init` would compile for long)."""
  rng = np.random.default_rng(0)

  def conv(cin, cout):
    kernel = rng.normal(size=(3, 3, cin, cout)) / np.sqrt(9 * cin)
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.zeros((cout,), jnp.float32)}

  variables = {"params": {"conv2": conv(3, 8), "conv3": conv(8, 16)}}
  return StandInBackbone(), variables


def random_images(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


# ------------------------------------------------------------------ NumPy references


def np_avg_pool_3x3(x):
  """3x3 mean, stride 1, zero padding that counts: always divide by 9."""
  _, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def np_bilinear(x, out_h, out_w):
  """torch F.interpolate(mode='bilinear', align_corners=False), one output pixel at a time."""
  batch, in_h, in_w, channels = x.shape
  out = np.zeros((batch, out_h, out_w, channels))

  def source(dst, in_size, out_size):
    src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
    lo = min(int(np.floor(src)), in_size - 1)
    return lo, min(lo + 1, in_size - 1), src - lo

  for oy in range(out_h):
    y0, y1, ly = source(oy, in_h, out_h)
    for ox in range(out_w):
      x0, x1, lx = source(ox, in_w, out_w)
      top = (1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1]
      bottom = (1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]
      out[:, oy, ox] = (1 - ly) * top + ly * bottom
  return out


def np_embed(model, variables, images):
  features = model.apply(variables, images, stages=("layer2", "layer3"))
  layer2 = np_avg_pool_3x3(np.asarray(features["layer2"], np.float64))
  layer3 = np_avg_pool_3x3(np.asarray(features["layer3"], np.float64))
  layer3 = np_bilinear(layer3, *layer2.shape[1:3])
  return np.concatenate([layer2, layer3], axis=-1)


def np_distances(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def np_anomaly_maps(grid, size):
  """Nearest upsample (src = floor(dst * in / out)), scipy Gaussian sigma 4, mirror borders."""
  grid = np.asarray(grid, np.float64)
  in_h, in_w = grid.shape[-2:]
  rows = (np.arange(size[0]) * in_h) // size[0]
  cols = (np.arange(size[1]) * in_w) // size[1]
  up = grid[:, rows[:, None], cols[None, :]]
  return np.stack([ndimage.gaussian_filter(m, sigma=4.0, truncate=4.0, mode="mirror") for m in up])


def np_image_scores(patches, bank, num_neighbors=9):
  """anomalib's compute_anomaly_score, brute force, float64."""
  bank = np.asarray(bank, np.float64)
  scores = []
  for image_patches in np.asarray(patches, np.float64):
    dist = np_distances(image_patches, bank)
    nn_dist, nn_index = dist.min(1), dist.argmin(1)
    star = int(np.argmax(nn_dist))
    m_star = int(nn_index[star])
    to_m = np_distances(bank[m_star : m_star + 1], bank)[0]
    others = [int(i) for i in np.argsort(to_m, kind="stable") if i != m_star]
    support = [m_star] + others[: min(num_neighbors, len(bank)) - 1]
    d = np_distances(image_patches[star : star + 1], bank[support])[0]
    softmax = np.exp(d - d.max()) / np.exp(d - d.max()).sum()
    scores.append(nn_dist[star] * (1.0 - softmax[0]))
  return np.asarray(scores)


def np_kcenter(features, start, size):
  """Plain k-center greedy as anomalib's KCenterGreedy (start row not in the output)."""
  features = np.asarray(features, np.float64)
  min_dist = np.linalg.norm(features - features[start], axis=1)
  chosen = []
  for _ in range(size):
    index = int(np.argmax(min_dist))
    chosen.append(index)
    min_dist = np.minimum(min_dist, np.linalg.norm(features - features[index], axis=1))
  return np.asarray(chosen)


def max_intermediate_size(jaxpr) -> int:
  """The element count of the largest value any equation (at any nesting) produces."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple | list) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          largest = max(largest, max_intermediate_size(sub.jaxpr))
        elif isinstance(sub, jax.extend.core.Jaxpr):
          largest = max(largest, max_intermediate_size(sub))
  return largest


def one_device_mesh():
  return parallel.data_mesh(jax.devices()[:1])


# ------------------------------------------------------------------------- embedding


def test_bilinear_known_values_and_jax_resize():
  # torch: F.interpolate([[0, 1]], size=4, mode="bilinear", align_corners=False).
  x = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
  out = patchcore.resize_bilinear(jnp.tile(x, (1, 2, 1, 1)), (2, 4))
  np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-7)
  grid = random_images(1, (2, 5, 4, 3))
  for size in [(9, 7), (13, 11)]:
    ours = patchcore.resize_bilinear(grid, size)
    np.testing.assert_allclose(ours, np_bilinear(np.asarray(grid, np.float64), *size), atol=1e-6)
    # For upsampling, jax.image.resize("linear", antialias=False) is the same resize.
    theirs = jax.image.resize(grid, (2, *size, 3), "linear", antialias=False)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_embed_matches_numpy(backbone, size):
  model, variables = backbone
  images = random_images(2, (2, *size, 3))
  ours = patchcore.embed(model, variables, images)
  expected = np_embed(model, variables, images)
  assert ours.shape == expected.shape == (2, -(-size[0] // 8), -(-size[1] // 8), 24)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
  # Layer2 first, average-pooled with the zero padding counted (corner: 4 of 9 terms).
  layer2 = np.asarray(model.apply(variables, images, stages=("layer2",))["layer2"])
  np.testing.assert_allclose(ours[:, 0, 0, :8], layer2[:, :2, :2].sum((1, 2)) / 9, atol=1e-5)


# ---------------------------------------------------------------- random projection


def test_projection_dimension_and_entries():
  # sklearn's Johnson-Lindenstrauss bound and its SparseRandomProjection entries.
  n, dim = 784, 1536
  k = patchcore.johnson_lindenstrauss_dim(n, dim, 0.9)
  assert k == random_projection.johnson_lindenstrauss_min_dim(n, eps=0.9) == 164
  assert patchcore.johnson_lindenstrauss_dim(1000, 64, 0.9) == 64  # capped at D
  matrix = np.asarray(patchcore.sparse_random_projection(jax.random.key(3), n, dim))
  assert matrix.shape == (k, dim) and matrix.dtype == np.float32
  sk = random_projection.SparseRandomProjection(eps=0.9, random_state=0)
  sk.fit(np.zeros((n, dim)))
  assert sk.n_components_ == k and np.isclose(sk.density_, 1 / np.sqrt(dim))
  value = np.unique(np.abs(sk.components_.data))
  assert value.size == 1
  np.testing.assert_allclose(np.unique(np.abs(matrix[matrix != 0])), value, rtol=1e-6)
  nonzero = matrix != 0
  assert abs(nonzero.mean() / sk.density_ - 1) < 0.06
  assert abs((matrix > 0).sum() / nonzero.sum() - 0.5) < 0.03


# ---------------------------------------------------------------------------- coreset


def test_coreset_matches_numpy_kcenter():
  n, dim = 500, 300  # projected to 153 < 300 dimensions
  embeddings = np.random.default_rng(4).normal(size=(n, dim)).astype(np.float32)
  key = jax.random.key(5)
  ours = patchcore.coreset_indices(embeddings, key, 0.1, chunk_size=37)
  projection_key, start_key = jax.random.split(key)
  matrix = np.asarray(patchcore.sparse_random_projection(projection_key, n, dim))
  assert matrix.shape[0] == 153
  start = int(patchcore.coreset_start(start_key, n))
  expected = np_kcenter(embeddings.astype(np.float64) @ matrix.T.astype(np.float64), start, 50)
  np.testing.assert_array_equal(ours, expected)


def test_coreset_one_and_eight_devices_agree_with_bounded_memory():
  n, dim, chunk = 3001, 16, 128  # n divisible by neither the chunk nor the devices
  embeddings = np.random.default_rng(6).normal(size=(n, dim)).astype(np.float32)
  key = jax.random.key(7)
  eight = patchcore.coreset_indices(embeddings, key, 0.1, chunk_size=chunk)
  one = patchcore.coreset_indices(embeddings, key, 0.1, chunk_size=chunk, mesh=one_device_mesh())
  assert eight.shape == (300,) and len(set(np.asarray(eight).tolist())) == 300
  np.testing.assert_array_equal(eight, one)
  # No n x n array anywhere: the largest value is the (padded) input itself.
  jaxpr = jax.make_jaxpr(lambda e: patchcore.coreset_indices(e, key, 0.1, chunk_size=chunk))
  largest = max_intermediate_size(jaxpr(jnp.asarray(embeddings)).jaxpr)
  assert largest <= (n + 8 * chunk) * dim < n * n // 50


def test_coreset_ratio_one_keeps_all_rows_in_order(backbone):
  model, variables = backbone
  shots = random_images(8, (2, 64, 64, 3))
  np.testing.assert_array_equal(
    patchcore.coreset_indices(np.zeros((10, 3)), jax.random.key(0), 1.0), np.arange(10)
  )
  bank = patchcore.fit(model, variables, shots, jax.random.key(9), coreset_ratio=1.0)
  embeddings = np.asarray(patchcore.embed(model, variables, shots))
  np.testing.assert_array_equal(bank.rows, embeddings.reshape(-1, 24))
  assert bank.grid == (8, 8) and bank.rows.dtype == jnp.float32


def test_many_shots_are_embedded_in_batches(backbone, monkeypatch):
  """The bank of 5 shots embedded 2 at a time is the NumPy embedding of all 5."""
  model, variables = backbone
  shots = random_images(11, (5, 64, 64, 3))
  monkeypatch.setattr(patchcore, "EMBED_BATCH", 2)
  bank = patchcore.fit(model, variables, shots, jax.random.key(9), coreset_ratio=1.0)
  expected = np_embed(model, variables, shots).reshape(-1, 24)
  np.testing.assert_allclose(bank.rows, expected, rtol=1e-5, atol=1e-5)


def test_coreset_settings_are_checked():
  for ratio in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="coreset_ratio"):
      patchcore.coreset_indices(np.zeros((100, 4)), jax.random.key(0), ratio)
  with pytest.raises(ValueError, match="keeps no row"):
    patchcore.coreset_indices(np.zeros((9, 4)), jax.random.key(0), 0.1)
  assert patchcore.coreset_size(7840, 0.1) == 784 and patchcore.coreset_size(785, 0.1) == 78


# ---------------------------------------------------------------------------- scoring


def test_nearest_matches_brute_force_in_bounded_chunks():
  rng = np.random.default_rng(10)
  patches = rng.normal(size=(1000, 8)).astype(np.float32)
  bank = rng.normal(size=(1500, 8)).astype(np.float32)
  dist, index = patchcore.nearest(patches, bank, chunk_size=100)
  expected = np_distances(patches, bank)
  np.testing.assert_allclose(dist, expected.min(1), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(index, expected.argmin(1))
  dist, index = patchcore.nearest(patches, bank, chunk_size=77)  # 1500 % 77 != 0
  np.testing.assert_array_equal(index, expected.argmin(1))
  jaxpr = jax.make_jaxpr(lambda p, b: patchcore.nearest(p, b, chunk_size=100))(patches, bank)
  assert max_intermediate_size(jaxpr.jaxpr) <= 1000 * 100 < 1000 * 1500


def test_anomaly_map_matches_scipy():
  assert patchcore.BLUR_SIZE == 33 == 2 * int(4.0 * 4 + 0.5) + 1
  for grid_size, size in [((9, 7), (72, 56)), ((5, 6), (37, 50))]:
    grid = random_images(11, (2, *grid_size)) ** 2
    ours = patchcore.anomaly_map(grid, size)
    assert ours.shape == (2, *size)
    np.testing.assert_allclose(ours, np_anomaly_maps(grid, size), rtol=1e-5, atol=1e-6)
  # An impulse spreads over exactly 33 pixels per axis (scipy: radius int(4 * 4 + 0.5) = 16).
  impulse = jnp.zeros((1, 80, 80)).at[0, 40, 40].set(1.0)
  response = np.asarray(patchcore.anomaly_map(impulse, (80, 80)))[0]
  assert np.count_nonzero(response[40]) == 33 and np.count_nonzero(response[:, 40]) == 33
  np.testing.assert_allclose(response.sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("bank_rows", [200, 5, 1])
def test_image_score_matches_reference(bank_rows):
  rng = np.random.default_rng(12)
  patches = rng.normal(size=(3, 30, 6)).astype(np.float32)
  bank = rng.normal(size=(bank_rows, 6)).astype(np.float32)
  dist, index = patchcore.nearest(patches.reshape(-1, 6), bank, chunk_size=64)
  scores = patchcore.image_score(dist.reshape(3, 30), index.reshape(3, 30), patches, bank)
  np.testing.assert_allclose(scores, np_image_scores(patches, bank), rtol=1e-5, atol=1e-6)
  if bank_rows == 1:
    np.testing.assert_array_equal(scores, 0.0)


@pytest.fixture(scope="module")
def scored(backbone):
  """A bank of every shot embedding (ratio 1) and the one-device scores of 8 images."""
  model, variables = backbone
  shots = random_images(13, (3, 64, 64, 3))
  images = random_images(14, (8, 64, 64, 3))
  bank = patchcore.fit(model, variables, shots, jax.random.key(1), coreset_ratio=1.0)
  maps, scores = patchcore.score(model, variables, bank, images)
  return shots, images, bank, maps, scores


def test_score_end_to_end_matches_reference(backbone, scored):
  model, variables = backbone
  shots, images, _, maps, scores = scored
  assert maps.shape == (8, 64, 64) and scores.shape == (8,)
  bank_rows = np_embed(model, variables, shots).reshape(-1, 24)
  test_patches = np_embed(model, variables, images).reshape(8, -1, 24)
  grid = np.stack([np_distances(p, bank_rows).min(1) for p in test_patches]).reshape(8, 8, 8)
  np.testing.assert_allclose(maps, np_anomaly_maps(grid, (64, 64)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(scores, np_image_scores(test_patches, bank_rows), rtol=1e-4)


def test_one_and_eight_devices_give_the_same_bank_and_scores(backbone, scored):
  model, variables = backbone
  shots, images, bank, maps, scores = scored
  key = jax.random.key(2)
  coreset = patchcore.fit(model, variables, shots, key, 0.1, chunk_size=16)
  one = one_device_mesh()
  coreset_one = patchcore.fit(model, variables, shots, key, 0.1, chunk_size=16, mesh=one)
  assert coreset.rows.shape == (19, 24)  # int(3 * 64 * 0.1)
  np.testing.assert_array_equal(coreset.rows, coreset_one.rows)
  # One device: the plain jitted `score`; eight: the data-parallel step.
  mesh = parallel.data_mesh()
  scorer = patchcore.make_scorer(model, mesh)
  state = parallel.replicate((variables, bank), mesh)
  sharded_maps, sharded_scores = scorer(state, parallel.shard_batch(images, mesh))
  assert sharded_maps.sharding.is_equivalent_to(parallel.batch_sharded(mesh), 3)
  assert sharded_scores.sharding.is_equivalent_to(parallel.batch_sharded(mesh), 1)
  np.testing.assert_allclose(sharded_maps, maps, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded_scores, scores, rtol=1e-5, atol=1e-6)

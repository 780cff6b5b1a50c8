"""PMAD's building blocks: training masks, the RealNVP flow, proposal masking."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from maeday_jax.pmad import flow, masking, proposal

GRID = (8, 8)
N = 64


def _keys(count, seed=0):
  return jax.random.split(jax.random.key(seed), count)


def _textured_images(batch=3, size=32, seed=0):
  """Images whose left half is noise and right half flat grey, plus a bright square."""
  rng = np.random.default_rng(seed)
  images = np.full((batch, size, size, 3), 0.5, np.float32)
  images[:, :, : size // 2] = rng.uniform(0, 1, (batch, size, size // 2, 3))
  return jnp.asarray(images)


# ---------------------------------------------------------------- masking


def _repeat_first_key(keys):
  """`keys` with keys[1] replaced by keys[0]."""
  return jnp.concatenate([keys[:1], keys[:1], keys[2:]])


@pytest.mark.parametrize("num_masked", [0, 1, 13, 64])
def test_random_and_blockwise_masks(num_masked):
  """Exact counts; a pure function of the key (rows 0 and 1 share a key)."""
  keys = _repeat_first_key(_keys(64))
  for make in (masking.random_mask, masking.blockwise_mask):
    masks = np.asarray(jax.vmap(lambda k, make=make: make(k, GRID, num_masked))(keys))
    assert masks.shape == (64, N) and masks.dtype == bool
    assert (masks.sum(axis=1) == num_masked).all(), make.__name__
    np.testing.assert_array_equal(masks[0], masks[1])
    if 0 < num_masked < N:
      assert not np.array_equal(masks[0], masks[2]), make.__name__
      assert len({m.tobytes() for m in masks}) > (50 if num_masked > 1 else 30)


def test_weighted_mask_counts_including_zero_weights():
  weights = jnp.asarray([0.0, 1.0, 0.0, 2.0, 0.0, 0.0])
  keys = _repeat_first_key(_keys(2000))
  for num_masked in (0, 2, 4, 6):
    masks = np.asarray(jax.vmap(lambda k, n=num_masked: masking.weighted_mask(k, weights, n))(keys))
    assert (masks.sum(axis=1) == num_masked).all()
    np.testing.assert_array_equal(masks[0], masks[1])
    if num_masked >= 2:  # Both positive weights are always drawn before any zero one.
      assert masks[:, [1, 3]].all()
    if num_masked == 4:  # Two zero-weight patches out of four, uniformly among them.
      np.testing.assert_allclose(masks[:, [0, 2, 4, 5]].mean(axis=0), 0.5, atol=0.05)
      assert not np.array_equal(masks[0], masks[2])
  # All zero: uniform.
  masks = np.asarray(jax.vmap(lambda k: masking.weighted_mask(k, jnp.zeros(6), 2))(keys))
  np.testing.assert_allclose(masks.mean(axis=0), 2 / 6, atol=0.04)


def _mean_components(masks):
  return np.mean([ndimage.label(m.reshape(14, 14))[1] for m in masks])


def test_blockwise_masks_are_contiguous():
  keys = _keys(200, seed=1)
  block = np.asarray(jax.vmap(lambda k: masking.blockwise_mask(k, (14, 14), 75))(keys))
  rand = np.asarray(jax.vmap(lambda k: masking.random_mask(k, (14, 14), 75))(keys))
  assert (block.sum(axis=1) == 75).all()
  block_components, random_components = _mean_components(block), _mean_components(rand)
  assert block_components < 0.3 * random_components, (block_components, random_components)
  # Blocks land everywhere: every patch is masked sometimes.
  assert block.any(axis=0).all()


def test_blockwise_rejects_bad_parameters():
  with pytest.raises(ValueError, match="num_masked"):
    masking.blockwise_mask(jax.random.key(0), GRID, 65)
  with pytest.raises(ValueError, match="max_aspect"):
    masking.blockwise_mask(jax.random.key(0), GRID, 4, max_aspect=0.5)


def _plackett_luce_inclusion(weights, k):
  """Exact probability that each item is among k draws without replacement, P ~ weights."""
  n = len(weights)
  inclusion = np.zeros(n)
  for order in itertools.permutations(range(n), k):
    p, left = 1.0, float(sum(weights))
    for i in order:
      p *= weights[i] / left
      left -= weights[i]
    inclusion[list(order)] += p
  return inclusion


def test_weighted_mask_draws_in_proportion_to_weights():
  weights = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
  draws = 6000
  keys = _keys(draws, seed=2)
  first = np.asarray(jax.vmap(lambda k: masking.weighted_mask(k, jnp.asarray(weights), 1))(keys))
  observed = first.sum(axis=0)
  expected = draws * weights / weights.sum()
  chi2 = np.sum((observed - expected) ** 2 / expected)
  assert chi2 < 18.5, (observed, expected)  # 4 degrees of freedom: p ~ 0.001.
  # Two draws without replacement: marginal inclusion as the sequential process gives.
  two = np.asarray(jax.vmap(lambda k: masking.weighted_mask(k, jnp.asarray(weights), 2))(keys))
  np.testing.assert_allclose(two.mean(axis=0), _plackett_luce_inclusion(weights, 2), atol=0.02)
  # Scale does not matter, tiny and huge weights included.
  scaled = masking.weighted_mask(keys[0], jnp.asarray(weights) * 1e-30, 2)
  np.testing.assert_array_equal(scaled, two[0])


def test_frequency_weights_favour_texture():
  images = _textured_images()
  weights = np.asarray(masking.frequency_weights(images, 8))
  assert weights.shape == (3, 16)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
  grid = weights.reshape(3, 4, 4)
  textured, flat = grid[:, :, :2], grid[:, :, 2:]
  # Flat patches away from the boundary only have the floor; texture has the rest.
  assert (textured.min(axis=(1, 2)) > 5 * flat[:, :, 1:].max(axis=(1, 2))).all()
  np.testing.assert_allclose(flat[:, :, 1:], masking.FLOOR / 16, rtol=1e-5)
  # A flat image: uniform.
  np.testing.assert_allclose(masking.frequency_weights(jnp.ones((1, 16, 16, 3)), 8), 1 / 4)
  with pytest.raises(ValueError, match="patch_size"):
    masking.frequency_weights(images, 7)


def test_dynamic_weights_and_error_ema():
  np.testing.assert_allclose(masking.dynamic_weights(jnp.zeros(4)), 0.25)
  weights = np.asarray(masking.dynamic_weights(jnp.asarray([0.0, 1.0, 3.0, -2.0]), floor=0.2))
  np.testing.assert_allclose(weights, [0.05, 0.05 + 0.2, 0.05 + 0.6, 0.05], rtol=1e-6)
  ema = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  errors = jnp.asarray([[10.0, 20.0, 30.0, jnp.nan], [30.0, 0.0, 50.0, 60.0]])
  masks = jnp.asarray([[True, True, False, False], [True, False, False, False]])
  updated = masking.update_error_ema(ema, errors, masks, 0.75)
  # Position 0: mean of 10 and 30; position 1: 20 (masked once); 2 and 3 unmasked.
  np.testing.assert_allclose(updated, [0.75 + 5.0, 1.5 + 5.0, 3.0, 4.0], rtol=1e-6)
  one = masking.update_error_ema(ema, errors[1], masks[1], 0.5)
  np.testing.assert_allclose(one, [15.5, 2.0, 3.0, 4.0])


def _object_images():
  """Grey backdrop with a red 16 x 16 square in the middle (patches 8: grid 4 x 4)."""
  images = np.full((2, 32, 32, 3), 0.4, np.float32)
  images[:, 8:24, 8:24] = [0.9, 0.1, 0.1]
  images[1] += np.random.default_rng(0).normal(0, 0.02, images[1].shape)
  return jnp.asarray(images)


def test_foreground_and_region_weights():
  images = _object_images()
  foreground = np.asarray(masking.foreground_from_images(images, 8))
  inside = np.zeros((4, 4), bool)
  inside[1:3, 1:3] = True
  inside = inside.reshape(-1)
  assert (foreground[:, inside] > 0.99).all()
  assert (foreground[:, ~inside] < 0.05).all()
  np.testing.assert_allclose(masking.foreground_from_images(jnp.ones((1, 16, 16, 3)), 8), 0)
  weights = np.asarray(masking.region_weights(jnp.asarray(foreground), inside=3.0))
  np.testing.assert_allclose(weights[:, inside], 3.0, rtol=1e-4)
  np.testing.assert_allclose(weights[:, ~inside], 1.0, atol=0.1)
  masks = np.asarray(
    jax.vmap(lambda k: masking.weighted_mask(k, jnp.asarray(weights[0]), 4))(_keys(2000))
  )
  assert masks[:, inside].mean() > 2 * masks[:, ~inside].mean()


def test_mixed_masks_with_one_strategy_are_that_strategy():
  images = jnp.concatenate([_object_images(), _textured_images(2)])
  grid = (4, 4)

  @jax.jit
  def both(key, images, ema):
    """{strategy: (mixed_masks with only it, its own masks with mixed_masks' keys)}."""
    _, mask_key = jax.random.split(key)
    keys = jax.random.split(mask_key, 4)

    def weighted(weights):
      return jax.vmap(lambda k, w: masking.weighted_mask(k, w, 10))(keys, weights)

    expected = {
      "random": jax.vmap(lambda k: masking.random_mask(k, grid, 10))(keys),
      "blockwise": jax.vmap(lambda k: masking.blockwise_mask(k, grid, 10))(keys),
      "frequency": weighted(masking.frequency_weights(images, 8)),
      "dynamic": weighted(jnp.broadcast_to(masking.dynamic_weights(ema), (4, 16))),
      "region": weighted(masking.region_weights(masking.foreground_from_images(images, 8))),
    }
    assert tuple(expected) == masking.STRATEGIES
    out = {}
    for name, want in expected.items():
      other = "random" if name != "random" else "region"
      probabilities = {name: 1.0, other: 0.0}
      out[name] = (masking.mixed_masks(key, images, 8, 10, probabilities, ema), want)
    return out

  for name, (got, want) in both(jax.random.key(7), images, jnp.linspace(0.0, 1.0, 16)).items():
    np.testing.assert_array_equal(got, want, err_msg=name)
    assert (np.asarray(got).sum(axis=1) == 10).all()


def test_mixed_masks_draw_a_strategy_per_image():
  images = jnp.tile(_textured_images(1, size=64), (64, 1, 1, 1))  # Grid 8 x 8.
  _, mask_key = jax.random.split(jax.random.key(7))
  keys = jax.random.split(mask_key, 64)
  random = np.asarray(jax.vmap(lambda k: masking.random_mask(k, GRID, 13))(keys))
  block = np.asarray(jax.vmap(lambda k: masking.blockwise_mask(k, GRID, 13))(keys))
  probabilities = {"random": 1.0, "blockwise": 3.0}
  got = np.asarray(masking.mixed_masks(jax.random.key(7), images, 8, 13, probabilities))
  is_random = (got == random).all(axis=1)
  is_block = (got == block).all(axis=1)
  assert (is_random | is_block).all()
  assert 8 <= is_random.sum() <= 24  # About a quarter random.
  assert (got.sum(axis=1) == 13).all()


def test_mixed_masks_reject_bad_settings():
  images = _textured_images(1)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="Unknown masking strategies"):
    masking.mixed_masks(key, images, 8, 4, {"checkerboard": 1.0})
  with pytest.raises(ValueError, match="error_ema"):
    masking.mixed_masks(key, images, 8, 4, {"dynamic": 1.0})
  with pytest.raises(ValueError, match="positive"):
    masking.mixed_masks(key, images, 8, 4, {"random": 0.0})


# ---------------------------------------------------------------- flow

DIM = 5


def _random_flow(seed=0):
  """A flow whose couplings are far from the identity (zero-initialised output layers
  replaced by random ones) and whose ActNorm is not trivial."""
  module, params = flow.init_flow(jax.random.key(seed), DIM, num_couplings=4, hidden=16)
  rng = np.random.default_rng(seed)
  leaves, tree = jax.tree.flatten(params)
  leaves = [np.asarray(x) + rng.normal(0, 0.25, x.shape).astype(np.float32) for x in leaves]
  return module, jax.tree.unflatten(tree, leaves)


def _numpy_log_likelihood(params, x, max_log_scale=2.0):
  """RealNVP written out in NumPy (float64) from the parameter tree."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  dim = x.shape[1]
  z = (x - p["loc"]) / np.exp(p["log_scale"])
  log_det = np.full(len(x), -p["log_scale"].sum())
  silu = lambda v: v / (1 + np.exp(-v))
  layer = 0
  while f"nets_{layer}" in p:
    net = p[f"nets_{layer}"]
    kept = (np.arange(dim) % 2) == (layer % 2)
    h = z * kept
    for name in ("Dense_0", "Dense_1"):
      h = silu(h @ net[name]["kernel"] + net[name]["bias"])
    out = h @ net["Dense_2"]["kernel"] + net["Dense_2"]["bias"]
    s = max_log_scale * np.tanh(out[:, :dim] / max_log_scale)
    t = out[:, dim:]
    z = np.where(kept, z, z * np.exp(s) + t)
    log_det += np.where(kept, 0.0, s).sum(axis=1)
    layer += 1
  assert layer == 4
  return -0.5 * (z**2).sum(axis=1) - 0.5 * dim * np.log(2 * np.pi) + log_det


def test_flow_log_likelihood_matches_numpy():
  module, params = _random_flow()
  x = np.random.default_rng(0).normal(0, 1.5, (32, DIM)).astype(np.float32)
  got = jax.jit(lambda p, v: flow.log_likelihood(p, module, v))(params, x)
  assert got.dtype == jnp.float32 and got.shape == (32,)
  np.testing.assert_allclose(got, _numpy_log_likelihood(params, x), rtol=1e-5, atol=1e-4)


def test_flow_inverse_and_log_det():
  module, params = _random_flow(seed=3)
  x = jnp.asarray(np.random.default_rng(1).normal(0, 1, (16, DIM)), jnp.float32)

  def forward(v):
    return module.apply({"params": params}, v)

  @jax.jit
  def run(v):
    z, log_det = forward(v)
    back = module.apply({"params": params}, z, method=flow.CouplingFlow.inverse)
    jacobians = jax.vmap(jax.jacfwd(lambda row: forward(row)[0]))(v)  # (16, D, D)
    return z, log_det, back, jacobians

  z, log_det, back, jacobians = run(x)
  np.testing.assert_allclose(back, x, atol=1e-5)
  assert not np.allclose(z, x, atol=0.1)  # The map is far from the identity.
  _, numeric = np.linalg.slogdet(np.asarray(jacobians, np.float64))
  np.testing.assert_allclose(log_det, numeric, atol=1e-4)


def test_fit_flow_learns_a_correlated_gaussian():
  rng = np.random.default_rng(0)
  dim = 4
  cov = np.array([[1, 0.9, 0.81, 0], [0.9, 1, 0.9, 0], [0.81, 0.9, 1, 0.9], [0, 0, 0.9, 1]])
  cov = cov + 0.4 * np.eye(dim)  # Strongly correlated, positive definite.
  mean = rng.normal(0, 3, dim)
  chol = np.linalg.cholesky(cov)
  train = (mean + rng.normal(0, 1, (4000, dim)) @ chol.T).astype(np.float32)
  test = (mean + rng.normal(0, 1, (2000, dim)) @ chol.T).astype(np.float32)
  fit = functools.partial(flow.fit_flow, steps=400, batch_size=256, learning_rate=3e-3, hidden=32)
  params, losses = fit(jax.random.key(0), train)
  params_again, _ = fit(jax.random.key(0), train)
  np.testing.assert_array_equal(
    params["nets_0"]["Dense_2"]["kernel"], params_again["nets_0"]["Dense_2"]["kernel"]
  )
  assert losses.shape == (400,)
  module = flow.CouplingFlow(dim, hidden=32)
  got = float(np.mean(flow.log_likelihood(params, module, test)))
  diff = test - mean
  _, logdet = np.linalg.slogdet(cov)
  quad = np.einsum("md,de,me->m", diff, np.linalg.inv(cov), diff)
  truth = float(np.mean(-0.5 * quad - 0.5 * logdet - 0.5 * dim * math.log(2 * math.pi)))
  # Start: ActNorm alone, an independent Gaussian per dimension.
  start = float(np.mean(losses[:10]))
  assert -start < truth - 0.8, (start, truth)
  assert float(np.mean(losses[-20:])) < start - 0.8
  assert truth - 0.15 < got < truth + 0.05, (got, truth)


# ---------------------------------------------------------------- proposals


def test_abnormality_by_hand():
  ll = jnp.asarray([[0.0, -1.0, math.log(0.25)], [-800.0, -1200.0, -800.5]])
  got = np.asarray(proposal.abnormality(ll))
  want = [[0.0, 1 - math.exp(-1.0), 0.75], [0.0, 1.0, -math.expm1(-0.5)]]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The naive formula loses everything there:
  naive = np.exp(np.float32(-800.0)) - np.exp(np.float32(-1200.0))
  assert naive == 0.0
  # expm1 keeps the tiny differences that 1 - exp rounds to 0 in float32.
  tiny = np.asarray(proposal.abnormality(jnp.asarray([[0.0, -1e-8]])))
  np.testing.assert_allclose(tiny, [[0.0, 1e-8]], rtol=1e-3)
  assert 1 - np.exp(np.float32(-1e-8)) == 0


def test_proposal_mask_counts_and_indices():
  ll = jnp.asarray(
    [[-1.0, -5.0, -3.0, -2.0, -4.0, -0.5, -6.0, -7.0], [-900.0, -1300.0, -2.0, -1300.0, 0, 0, 0, 0]]
  )
  got = np.asarray(proposal.proposal_mask(ll, 0.25))  # round(2) = 2 per image.
  np.testing.assert_array_equal(np.flatnonzero(got[0]), [6, 7])
  np.testing.assert_array_equal(np.flatnonzero(got[1]), [1, 3])
  got = np.asarray(proposal.proposal_mask(ll, 0.3))  # round(2.4) = 2.
  assert (got.sum(axis=1) == 2).all()
  got = np.asarray(proposal.proposal_mask(ll, 0.5))  # 4 per image.
  np.testing.assert_array_equal(np.flatnonzero(got[0]), [1, 4, 6, 7])
  np.testing.assert_array_equal(np.flatnonzero(got[1]), [0, 1, 2, 3])
  # Ties: lower index first (image 1 has four equal zeros).
  got = np.asarray(proposal.proposal_mask(ll, 0.75))  # 6 per image.
  np.testing.assert_array_equal(np.flatnonzero(got[1]), [0, 1, 2, 3, 4, 5])
  assert proposal.num_proposals(8, 0.01) == 1 and proposal.num_proposals(8, 0.3125) == 3
  for bad in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
      proposal.proposal_mask(ll, bad)


def test_residuals_match_brute_force():
  rng = np.random.default_rng(0)
  features = rng.normal(0, 1, (2, 7, 5)).astype(np.float32)
  prototypes = rng.normal(0, 1, (11, 5)).astype(np.float32)
  got = np.asarray(proposal.residuals(jnp.asarray(features), jnp.asarray(prototypes), 3))
  flat = features.reshape(-1, 5).astype(np.float64)
  d2 = ((flat[:, None] - prototypes[None].astype(np.float64)) ** 2).sum(-1)
  want = (flat - prototypes[d2.argmin(axis=1)]).reshape(2, 7, 5)
  np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="prototypes"):
    proposal.residuals(jnp.asarray(features), jnp.asarray(prototypes[:, :4]))

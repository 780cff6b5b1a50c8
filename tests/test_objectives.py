"""MALA's losses against independent references (scikit-image, scikit-learn, NumPy)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.metrics import log_loss

from maeday_jax.objectives import losses, plpm
from maeday_jax.objectives import ssim as ssim_lib

# Compiled once per shape: an eager call compiles each of its operations on its own, which
# took 2-3 times as long on CPU.
_ssim = jax.jit(ssim_lib.ssim, static_argnames=("win_size", "sigma", "k1", "k2"))
_ssim_map = jax.jit(ssim_lib.ssim_map, static_argnames=("sigma", "k1", "k2"))
_focal_loss = jax.jit(losses.focal_loss, static_argnames=("gamma", "alpha"))
_l1 = jax.jit(losses.l1)
_segmentation_l1 = jax.jit(losses.segmentation_l1)
_bce = jax.jit(losses.binary_cross_entropy_with_logits)


def _structured(rng, shape, data_range, offset=0.0):
  """Smooth gradients, a bright square and a disc, plus mild noise: SSIM well inside (0, 1)."""
  batch, height, width, channels = shape
  yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
  images = np.empty(shape)
  for b in range(batch):
    for c in range(channels):
      phase = rng.uniform(0, 2 * np.pi)
      image = 0.3 + 0.2 * np.sin(6 * xx + phase) * np.cos(4 * yy)
      image[height // 4 : height // 2, width // 3 : width // 2] += 0.3
      image[(yy - 0.7) ** 2 + (xx - 0.6) ** 2 < 0.03] -= 0.2
      images[b, ..., c] = image + 0.03 * rng.standard_normal((height, width))
  return offset + data_range * np.clip(images, 0, 1)


def _pair(kind, shape, data_range, seed=0):
  """A reference batch and a degraded copy (noise, a shift of brightness, a blurred band)."""
  rng = np.random.default_rng(seed)
  if kind == "random":
    x = rng.uniform(0, data_range, shape)
    y = 0.6 * x + 0.4 * rng.uniform(0, data_range, shape)
  else:
    x = _structured(rng, shape, data_range)
    y = x + 0.08 * data_range * rng.standard_normal(shape)
    y[:, :, : shape[2] // 2] = 0.9 * y[:, :, : shape[2] // 2] + 0.05 * data_range
  return x, y


def _skimage_ssim(x, y, data_range, **options):
  metrics = pytest.importorskip("skimage.metrics")
  return np.array(
    [
      metrics.structural_similarity(
        a,
        b,
        data_range=data_range,
        channel_axis=-1,
        gaussian_weights=True,
        use_sample_covariance=False,
        **options,
      )
      for a, b in zip(x, y, strict=True)
    ]
  )


@pytest.mark.parametrize(
  "kind, shape, data_range",
  [
    ("random", (2, 32, 32, 3), 1.0),
    ("structured", (2, 32, 32, 3), 1.0),
    ("structured", (2, 24, 40, 1), 255.0),
    ("random", (1, 17, 23, 2), 2.0),
    ("structured", (1, 11, 11, 3), 1.0),
    ("structured", (2, 48, 20, 3), 255.0),
  ],
)
def test_ssim_matches_skimage(kind, shape, data_range):
  x, y = _pair(kind, shape, data_range)
  expected = _skimage_ssim(x, y, data_range, sigma=1.5)
  got = _ssim(jnp.float32(x), jnp.float32(y), data_range=data_range)
  assert got.shape == (shape[0],)
  assert np.all((expected > 0.05) & (expected < 0.99))  # A discriminating case.
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
  "sigma, win_size",
  [
    (1.0, None),  # 9-tap filter, crop 4.
    (1.5, 7),  # 11-tap filter but crop 3: the reflected borders count.
    (2.0, 11),  # 15-tap filter, crop 5: the reflected borders count.
    (0.8, 3),
  ],
)
def test_ssim_window_and_borders_match_skimage(sigma, win_size):
  x, y = _pair("structured", (2, 26, 30, 3), 1.0, seed=3)
  options = {"sigma": sigma} if win_size is None else {"sigma": sigma, "win_size": win_size}
  expected = _skimage_ssim(x, y, 1.0, **options)
  got = _ssim(jnp.float32(x), jnp.float32(y), data_range=1.0, **options)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


def test_ssim_constants_match_skimage():
  x, y = _pair("random", (1, 20, 20, 3), 1.0, seed=5)
  expected = _skimage_ssim(x, y, 1.0, K1=0.05, K2=0.1)
  got = _ssim(jnp.float32(x), jnp.float32(y), data_range=1.0, k1=0.05, k2=0.1)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


def test_ssim_map_matches_skimage_full_map():
  metrics = pytest.importorskip("skimage.metrics")
  x, y = _pair("structured", (1, 24, 28, 2), 1.0, seed=7)
  _, expected = metrics.structural_similarity(
    x[0],
    y[0],
    data_range=1.0,
    channel_axis=-1,
    gaussian_weights=True,
    use_sample_covariance=False,
    full=True,
  )
  got = _ssim_map(jnp.float32(x), jnp.float32(y), data_range=1.0)
  assert got.shape == x.shape
  # Every pixel, borders included (where the symmetric padding decides the value).
  np.testing.assert_allclose(np.asarray(got[0]), expected, rtol=0, atol=2e-5)


def test_ssim_per_image_data_range_and_offset_images():
  # Images far from zero (values in [1000, 1255]): float32 moments must not cancel.
  x, y = _pair("structured", (2, 32, 32, 3), 255.0, seed=11)
  x, y = x + 1000.0, y + 1000.0
  ranges = np.array([255.0, 510.0])
  expected = np.concatenate(
    [_skimage_ssim(x[i : i + 1], y[i : i + 1], ranges[i]) for i in range(2)]
  )
  got = _ssim(jnp.float32(x), jnp.float32(y), data_range=jnp.asarray(ranges))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5)


def test_ssim_of_an_image_with_itself_is_one():
  x, _ = _pair("random", (3, 16, 24, 3), 1.0)
  x[2] = 0.25  # Zero variance: only the constants remain.
  np.testing.assert_allclose(np.asarray(_ssim(x, x, data_range=1.0)), 1.0, atol=1e-6)


def test_ssim_window_is_scipys_gaussian():
  ndimage = pytest.importorskip("scipy.ndimage")
  impulse = np.zeros(31)
  impulse[15] = 1.0
  expected = ndimage.gaussian_filter1d(impulse, 1.5, truncate=3.5)[10:21]
  window = ssim_lib.gaussian_window(1.5)
  assert window.shape == (11,) and ssim_lib.default_win_size(1.5) == 11
  np.testing.assert_allclose(window, expected, atol=1e-15)


def test_ssim_rejects_bad_inputs():
  with pytest.raises(ValueError, match="at least"):
    ssim_lib.ssim(jnp.zeros((1, 10, 16, 3)), jnp.zeros((1, 10, 16, 3)), data_range=1.0)
  x = jnp.zeros((1, 12, 16, 3))
  with pytest.raises(ValueError, match="odd"):
    ssim_lib.ssim(x, x, data_range=1.0, win_size=4)
  with pytest.raises(ValueError, match="one shape"):
    ssim_lib.ssim(x, x[..., :1], data_range=1.0)
  with pytest.raises(ValueError, match="positive"):
    ssim_lib.ssim(x, x, data_range=0.0, win_size=3)


def test_ssim_loss_matches_skimage_and_has_finite_gradients():
  x, y = _pair("structured", (2, 32, 32, 3), 1.0, seed=2)
  pred, target = jnp.float32(y), jnp.float32(x)
  loss_fn = jax.jit(lambda p, t: losses.ssim_loss(p, t, 1.0))
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss, grad = value_and_grad(pred, target)
  expected = np.mean(1.0 - _skimage_ssim(y, x, 1.0))
  np.testing.assert_allclose(float(loss), expected, atol=1e-5)
  assert grad.shape == pred.shape and bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.abs(grad).max()) > 0
  # The gradient is the loss's derivative: a central difference along a random direction.
  direction = jnp.asarray(np.random.default_rng(0).standard_normal(pred.shape), jnp.float32)
  eps = 1e-2
  plus, minus = loss_fn(pred + eps * direction, target), loss_fn(pred - eps * direction, target)
  numeric = (plus - minus) / (2 * eps)
  np.testing.assert_allclose(float(jnp.vdot(grad, direction)), float(numeric), rtol=2e-2)
  # A flat image against itself (zero variances): loss 0, a finite (zero) gradient.
  flat = jnp.full(pred.shape, 0.5)
  flat_loss, flat_grad = value_and_grad(flat, flat)
  assert abs(float(flat_loss)) < 1e-6
  np.testing.assert_allclose(np.asarray(flat_grad), 0.0, atol=1e-6)


def test_l1_plain_and_weighted():
  pred = np.array([[1.0, 2.0], [3.0, 5.0]])
  target = np.array([[0.0, 4.0], [3.0, 1.0]])
  assert float(_l1(pred, target)) == pytest.approx((1 + 2 + 0 + 4) / 4)
  weights = np.array([[1.0], [3.0]])  # Broadcast over the last axis: rows weigh 1 and 3.
  expected = (1 + 2 + 3 * 0 + 3 * 4) / (1 + 1 + 3 + 3)
  assert float(_l1(pred, target, weights)) == pytest.approx(expected)
  assert float(_l1(pred, target, np.zeros((2, 2)))) == 0.0
  grad = jax.grad(lambda p: _l1(p, target, jnp.zeros((2, 2))))(jnp.asarray(pred))
  assert bool(jnp.all(jnp.isfinite(grad)))


def _logits_1x1(anomaly, normal):
  return jnp.asarray([[[[anomaly, normal]]]], jnp.float32)  # (1, 1, 1, 2)


def test_focal_loss_by_hand():
  logits = _logits_1x1(2.0, 0.0)
  p_anomaly = math.exp(2.0) / (math.exp(2.0) + 1.0)  # 0.8808
  anomalous, normal = jnp.ones((1, 1, 1)), jnp.zeros((1, 1, 1))
  # gamma 0 is the cross-entropy of the target class.
  ce_easy, ce_hard = -math.log(p_anomaly), -math.log(1.0 - p_anomaly)
  assert float(_focal_loss(logits, anomalous, gamma=0.0)) == pytest.approx(ce_easy, 1e-6)
  assert float(_focal_loss(logits, normal, gamma=0.0)) == pytest.approx(ce_hard, 1e-6)
  # gamma 2 multiplies by (1 - p_t)^2: 0.0142 for the easy pixel, 0.776 for the hard one.
  easy = float(_focal_loss(logits, anomalous, gamma=2.0))
  hard = float(_focal_loss(logits, normal, gamma=2.0))
  assert easy == pytest.approx((1 - p_anomaly) ** 2 * ce_easy, 1e-6)
  assert hard == pytest.approx(p_anomaly**2 * ce_hard, 1e-6)
  assert easy / ce_easy < 0.02 < 0.7 < hard / ce_hard  # Easy pixels are down-weighted.
  # alpha weighs the anomaly class by alpha and the normal class by 1 - alpha.
  assert float(_focal_loss(logits, anomalous, gamma=2.0, alpha=0.25)) == pytest.approx(
    0.25 * (1 - p_anomaly) ** 2 * ce_easy, 1e-6
  )
  assert float(_focal_loss(logits, normal, gamma=2.0, alpha=0.25)) == pytest.approx(
    0.75 * p_anomaly**2 * ce_hard, 1e-6
  )
  # Two pixels: the mean.
  pair = jnp.asarray([[[[2.0, 0.0], [2.0, 0.0]]]])
  both = float(_focal_loss(pair, jnp.asarray([[[1.0, 0.0]]]), gamma=2.0))
  assert both == pytest.approx((easy + hard) / 2, 1e-6)


def _softmax_np(z):
  e = np.exp(z - z.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def test_focal_loss_with_gamma_zero_is_sklearn_log_loss():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (2, 8, 8, 2))
  mask = (rng.uniform(size=(2, 8, 8)) < 0.3).astype(np.float64)
  probs = _softmax_np(logits).reshape(-1, 2)
  # sklearn's columns are the sorted labels [0, 1]; label 1 (anomaly) is channel 0.
  expected = log_loss(mask.reshape(-1), probs[:, ::-1], labels=[0, 1])
  got = _focal_loss(jnp.float32(logits), jnp.float32(mask), gamma=0.0)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("gamma, alpha", [(2.0, None), (0.5, 0.25), (3.0, (2.0, 0.5))])
def test_focal_loss_matches_numpy_on_random_soft_masks(gamma, alpha):
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 3, (3, 16, 12, 2))
  mask = rng.uniform(size=(3, 16, 12))
  mask[0] = mask[0] > 0.5  # Hard masks in one image, soft elsewhere.
  p = _softmax_np(logits)
  q = np.stack([mask, 1 - mask], axis=-1)
  weights = np.ones(2) if alpha is None else np.asarray(alpha, float)
  if isinstance(alpha, float):
    weights = np.array([alpha, 1 - alpha])
  expected = np.mean(-np.sum(weights * q * (1 - p) ** gamma * np.log(p), axis=-1))
  got = _focal_loss(jnp.float32(logits), jnp.float32(mask), gamma=gamma, alpha=alpha)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_focal_loss_is_stable_for_saturated_logits():
  logits = jnp.asarray([[[[200.0, -200.0], [-200.0, 200.0]]]])
  mask = jnp.asarray([[[1.0, 1.0]]])  # One right, one completely wrong.
  loss, grad = jax.jit(jax.value_and_grad(lambda z: losses.focal_loss(z, mask, gamma=2.0)))(logits)
  assert float(loss) == pytest.approx(400.0 / 2, rel=1e-6)  # (1 - 0)^2 * 400, mean of 2.
  assert bool(jnp.all(jnp.isfinite(grad)))
  with pytest.raises(ValueError, match="2 channels"):
    losses.focal_loss(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2)))
  with pytest.raises(ValueError, match="without"):
    losses.focal_loss(jnp.zeros((1, 2, 2, 2)), jnp.zeros((1, 2, 3)))


def test_segmentation_l1_by_hand():
  # p_anomaly 0.5 against mask 1, p_anomaly 0.75 (logits log 3, 0) against mask 0.
  logits = jnp.asarray([[[[0.0, 0.0], [math.log(3.0), 0.0]]]])
  mask = jnp.asarray([[[1.0, 0.0]]])
  assert float(_segmentation_l1(logits, mask)) == pytest.approx((0.5 + 0.75) / 2, 1e-6)


def test_binary_cross_entropy_against_numpy_and_sklearn():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 3, 64)
  labels = (rng.uniform(size=64) < 0.5).astype(np.float64)
  probs = 1 / (1 + np.exp(-logits))
  formula = np.mean(-(labels * np.log(probs) + (1 - labels) * np.log(1 - probs)))
  got = float(_bce(jnp.float32(logits), jnp.float32(labels)))
  np.testing.assert_allclose(got, formula, rtol=1e-5)
  np.testing.assert_allclose(got, log_loss(labels, probs, labels=[0, 1]), rtol=1e-5)
  soft = rng.uniform(size=64)  # Soft labels: the same formula.
  expected = np.mean(-(soft * np.log(probs) + (1 - soft) * np.log(1 - probs)))
  got = _bce(jnp.float32(logits), jnp.float32(soft))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  # Saturated logits: exact, no overflow.
  extreme = _bce(jnp.asarray([100.0, -100.0]), jnp.ones(2))
  assert float(extreme) == pytest.approx((0.0 + 100.0) / 2)


def test_plpm_shapes_and_parameters():
  # The default widths: shapes only (eval_shape computes nothing).
  model = plpm.PseudoLabelPredictor()
  images = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  assert sorted(params) == ["conv_0", "conv_1", "conv_2", "conv_3", "head"]
  assert params["conv_0"]["kernel"].shape == (3, 3, 3, 32)
  assert params["conv_3"]["kernel"].shape == (3, 3, 128, 256)
  assert params["head"]["kernel"].shape == (256, 1)
  assert jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, images).shape == (3,)
  # A small one, run: non-square images, and other sizes with the same parameters (the
  # global average pool).
  key = jax.random.key(0, impl="rbg")  # Fast to compile (see `_small_plpm`).
  small, small_params = plpm.init_plpm(key, (16, 48), widths=(4, 8))
  assert small_params["conv_1"]["kernel"].shape == (3, 3, 4, 8)
  apply = jax.jit(lambda x: small.apply({"params": small_params}, x))
  out = apply(jnp.zeros((2, 16, 48, 3)))
  assert out.shape == (2,) and out.dtype == jnp.float32
  assert apply(jnp.zeros((1, 40, 24, 3))).shape == (1,)


def _originals_and_noisy(seed, batch=8, size=32):
  rng = np.random.default_rng(seed)
  originals = _structured(rng, (batch, size, size, 3), 1.0)
  noisy = originals + 0.3 * rng.standard_normal(originals.shape)
  return jnp.float32(originals), jnp.float32(noisy)


def _small_plpm(seed):
  """A tiny PLPM and its two losses as closures over the module."""
  # An 'rbg' key: XLA:CPU took 10-20 s to compile the threefry initialisers here, against
  # under 2 s for these.
  model, params = plpm.init_plpm(jax.random.key(seed, impl="rbg"), 32, widths=(8, 16))
  d_loss = lambda p, o, r: plpm.discriminator_loss(p, model, o, r)
  a_loss = lambda p, r: plpm.adversarial_loss(p, model, r)
  return model, params, d_loss, a_loss


def test_plpm_losses_values_and_gradients():
  model, params, d_loss, a_loss = _small_plpm(1)
  originals, recons = _originals_and_noisy(0, batch=4)
  # One compiled program per loss: its value and its gradients w.r.t. both sides.
  d_value, d_grads = jax.jit(jax.value_and_grad(d_loss, argnums=(0, 2)))(params, originals, recons)
  a_value, a_grads = jax.jit(jax.value_and_grad(a_loss, argnums=(0, 1)))(params, recons)
  # The values: NumPy's BCE of the module's own logits.
  logits = jax.jit(lambda x: model.apply({"params": params}, x))(
    jnp.concatenate([originals, recons])
  )
  lo, lr = np.split(np.asarray(logits, np.float64), 2)
  softplus = lambda z: np.log1p(np.exp(z))
  # -log(1 - sigmoid(z)) = softplus(z) for label 0; -log(sigmoid(z)) = softplus(-z) for 1.
  np.testing.assert_allclose(
    float(d_value), np.mean(np.concatenate([softplus(lo), softplus(-lr)])), rtol=1e-5
  )
  np.testing.assert_allclose(float(a_value), np.mean(softplus(lr)), rtol=1e-5)
  # The gradients reach only the intended side.
  largest = lambda tree: max(float(jnp.abs(g).max()) for g in jax.tree.leaves(tree))
  finite = lambda tree: all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(tree))
  assert finite(a_grads) and finite(d_grads)
  # The MAE's adversarial term: a gradient for the reconstructions, none for the PLPM.
  assert largest(a_grads[1]) > 0 and largest(a_grads[0]) == 0
  # The discriminator's loss: a gradient for the PLPM, none for the reconstructions.
  assert largest(d_grads[0]) > 0 and largest(d_grads[1]) == 0


def test_discriminator_learns_to_tell_noisy_reconstructions():
  _, params, d_loss, _ = _small_plpm(2)
  originals, recons = _originals_and_noisy(1)
  fresh_o, fresh_r = _originals_and_noisy(2)
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(d_loss)(params, originals, recons)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  seen = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    seen.append(float(loss))
  assert seen[0] == pytest.approx(math.log(2), abs=0.1)  # Undecided at first.
  assert seen[-1] < 0.5 * seen[0]
  # And it generalises to fresh images of the same kind.
  assert float(jax.jit(d_loss)(params, fresh_o, fresh_r)) < 0.5 * seen[0]

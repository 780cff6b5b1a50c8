"""Few-shot adaptation: optimiser, augmentation, data-parallel step, adaptation, resume.

All training runs use the tiny `test` model (`tiny_mae`, `tiny_params`) and the same step
settings, so they share one compiled update step (plus one for a single device and one
for full fine-tuning).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from flax import traverse_util

from maeday_jax import augment, checkpoints, few_shot, models, parallel, training


def _textures(seed: int, count: int) -> np.ndarray:
  """Smooth synthetic 'normal' images: one family of low-frequency stripes, uint8."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:32, 0:32] / 32.0
  images = []
  for _ in range(count):
    phase = rng.uniform(0, 2 * np.pi, size=3)
    stripes = [np.sin(2 * np.pi * (1.5 * xx + 0.5 * yy) + phase[c]) for c in range(3)]
    images.append(np.stack(stripes, -1) * 60 + 128 + rng.normal(0, 3, (32, 32, 3)))
  return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _flat(tree) -> dict:
  return {"/".join(p): np.asarray(v) for p, v in traverse_util.flatten_dict(tree).items()}


def test_defaults_follow_the_paper():
  config = few_shot.get_train_config()
  assert (config.steps, config.batch_size, config.mask_ratio) == (50, 32, 0.75)
  assert (config.momentum, config.weight_decay, config.lora.rank) == (0.9, 0.05, 32)
  assert few_shot.learning_rate(config) == 1e-2
  config.finetune = "full"
  assert few_shot.learning_rate(config) == 1e-4
  config.learning_rate = 3e-3
  assert few_shot.learning_rate(config) == 3e-3
  config.finetune = "partial"
  with pytest.raises(ValueError, match="finetune must be one of"):
    few_shot.make_optimizer(config)
  config.finetune = "lora"
  assert few_shot.StepSettings.from_config(config).strategy.compute == "activations"
  config.lora.compute = "kernels"
  with pytest.raises(ValueError, match=r"lora.compute must be one of \('activations', 'weights'\)"):
    few_shot.StepSettings.from_config(config)


def test_optimizer_matches_pytorch_sgd():
  """Two steps of torch.optim.SGD(lr, momentum, weight_decay), written out in NumPy."""
  config = few_shot.get_train_config()
  lr, momentum, wd = 1e-2, 0.9, 0.05
  w = {
    "k": np.array([[0.5, -1.0], [2.0, 0.25]], np.float32),
    "b": np.array([1.0, -3.0], np.float32),
  }
  grads = [
    {"k": np.array([[0.1, 0.2], [-0.3, 0.4]], np.float32), "b": np.array([0.5, 0.0], np.float32)},
    {"k": np.array([[-0.2, 0.1], [0.0, 0.3]], np.float32), "b": np.array([-0.1, 0.2], np.float32)},
  ]
  expected, buf = dict(w), {}
  for step, g in enumerate(grads):
    for name in w:
      d = g[name] + wd * expected[name]  # decay added to the gradient
      buf[name] = d if step == 0 else momentum * buf[name] + d
      expected[name] = expected[name] - lr * buf[name]

  optimizer = few_shot.make_optimizer(config)
  params = jax.tree.map(jnp.asarray, w)
  state = optimizer.init(params)
  for g in grads:
    updates, state = optimizer.update(jax.tree.map(jnp.asarray, g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  for name in w:
    np.testing.assert_allclose(params[name], expected[name], rtol=1e-6, atol=1e-7)
  assert few_shot.make_optimizer(config) is optimizer  # same settings: same compiled step


@pytest.fixture(scope="module")
def augment_batch():
  """`augment.augment_batch` of each image with uniforms drawn from its own key."""

  def from_keys(keys, images):
    uniforms = jax.vmap(lambda k: jax.random.uniform(k, (augment.NUM_UNIFORMS,)))(keys)
    return augment.augment_batch(images, uniforms)

  return jax.jit(from_keys)


def test_augmentation_is_deterministic_from_the_key(augment_batch):
  images = jnp.asarray(_textures(0, 4), jnp.float32)
  keys = jax.random.split(jax.random.key(7), 4)
  first = augment_batch(keys, images)
  np.testing.assert_array_equal(first, augment_batch(keys, images))
  other = augment_batch(jax.random.split(jax.random.key(8), 4), images)
  assert first.shape == images.shape
  for a, b in zip(first, other, strict=True):
    assert np.abs(np.asarray(a) - np.asarray(b)).mean() > 1.0  # different crop/angle


def test_warp_geometry():
  warp = jax.jit(augment.warp)
  image = jnp.asarray(np.random.default_rng(0).normal(size=(9, 9, 2)), jnp.float32)
  center = jnp.array([4.0, 4.0])
  # No rotation and the whole image: the identity, exactly.
  np.testing.assert_array_equal(warp(image, 0.0, 1.0, center), image)
  # +90 degrees turns the content counter-clockwise, like np.rot90.
  turned = warp(image, np.pi / 2, 1.0, center)
  np.testing.assert_allclose(turned, np.rot90(np.asarray(image)), atol=1e-5)
  # A crop of half the side around (4, 4), resized back: every other output pixel is an
  # input pixel of rows/columns 2..6.
  zoomed = warp(image, 0.0, 0.5, center)
  np.testing.assert_allclose(zoomed[::2, ::2], image[2:7, 2:7], atol=1e-6)
  # Crop windows stay inside the image (before rotation) and have the asked-for area.
  uniforms = np.concatenate([np.random.default_rng(1).uniform(size=(200, 4)), [[0.0] * 4]])
  params = jax.vmap(lambda u: augment.warp_params(u, (32, 48), 30.0, (0.5, 0.9)))
  angle, side, c = jax.jit(params)(uniforms.astype(np.float32))
  half = np.asarray(side)[:, None] * (np.array([32, 48]) - 1) / 2
  assert np.all(c - half >= -1e-4) and np.all(c + half <= np.array([31, 47]) + 1e-4)
  assert np.all(side**2 >= 0.5 - 1e-6) and np.all(side**2 <= 0.9 + 1e-6)
  assert np.all(np.abs(angle) <= np.deg2rad(30.0) + 1e-6) and np.ptp(angle) > 0.9


@pytest.mark.parametrize(
  "mode, scipy_mode",
  [("reflect", "reflect"), ("mirror", "mirror"), ("nearest", "nearest"), ("wrap", "grid-wrap")],
)
def test_bilinear_sample_matches_scipy(mode, scipy_mode):
  rng = np.random.default_rng(1)
  image = rng.normal(size=(7, 6, 2)).astype(np.float32)
  rows = rng.uniform(-4, 11, size=(5, 5)).astype(np.float32)
  cols = rng.uniform(-4, 10, size=(5, 5)).astype(np.float32)
  got = augment.bilinear_sample(jnp.asarray(image), jnp.asarray(rows), jnp.asarray(cols), mode)
  for c in range(2):
    want = scipy.ndimage.map_coordinates(image[..., c], [rows, cols], order=1, mode=scipy_mode)
    np.testing.assert_allclose(got[..., c], want, atol=1e-5)


def test_training_batch_gives_each_copy_its_own_mask_and_augmentation(tiny_mae, train_config):
  shots = jnp.asarray(few_shot.as_model_input(tiny_mae, _textures(0, 2)))
  config = train_config(steps=1, batch_size=8)
  settings = few_shot.StepSettings.from_config(config)
  images, noise = jax.jit(lambda k: few_shot.training_batch(tiny_mae, shots, k, settings))(
    jax.random.key(0)
  )
  assert images.shape == (8, 32, 32, 3) and noise.shape == (8, tiny_mae.num_patches)
  assert len({tuple(np.argsort(n)[:4]) for n in np.asarray(noise)}) == 8
  # Copies 0 and 2 both come from shot 0 but are augmented differently.
  assert np.abs(np.asarray(images[0] - images[2])).mean() > 0.01
  closer_to_own_shot = (
    np.abs(np.asarray(images[0] - shots[0])).mean()
    < np.abs(np.asarray(images[0] - shots[1])).mean()
  )
  assert closer_to_own_shot


def test_step_is_the_same_on_one_and_eight_devices(tiny_params, tiny_mae):
  config = few_shot.get_train_config()
  settings = few_shot.StepSettings.from_config(config)
  optimizer = few_shot.make_optimizer(config)
  shots = few_shot.as_model_input(tiny_mae, _textures(0, 2))
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = parallel.data_mesh(devices)
    base, trainable = settings.strategy.split(tiny_params, jax.random.key(1))
    state = parallel.replicate(training.init_state(trainable, optimizer), mesh)
    base, placed_shots, key = parallel.replicate((base, shots, jax.random.key(2)), mesh)
    step = few_shot.make_train_step(tiny_mae, optimizer, mesh, settings)
    losses = []
    for _ in range(2):
      state, loss = step(state, base, placed_shots, key)
      losses.append(float(loss))
    assert int(state["step"]) == 2
    results.append((losses, jax.device_get(state["params"])))
  (losses_1, trained_1), (losses_8, trained_8) = results
  np.testing.assert_allclose(losses_1, losses_8, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), trained_1, trained_8
  )


def test_adaptation_lowers_the_heldout_loss(tiny_params, tiny_mae, train_config):
  shots, heldout = _textures(0, 2), _textures(1, 4)
  key = jax.random.key(3)
  before = few_shot.heldout_loss(tiny_mae, tiny_params, heldout, key)
  merged, history = few_shot.adapt(
    tiny_mae, tiny_params, shots, jax.random.key(4), train_config(steps=20)
  )
  after = few_shot.heldout_loss(tiny_mae, merged, heldout, key)
  assert after < 0.9 * before, (before, after, history["loss"])
  assert np.mean(history["loss"][-5:]) < np.mean(history["loss"][:5])
  assert history["step"] == list(range(1, 21)) and len(history["step_time_s"]) == 20
  assert history["compile_time_s"] > 0 and history["start_step"] == 0


def test_resume_equals_an_uninterrupted_run(tiny_params, tmp_path, tiny_mae, train_config):
  shots, key = _textures(2, 2), jax.random.key(5)
  config = train_config(steps=4, checkpoint_every=2)
  merged, history = few_shot.adapt(
    tiny_mae, tiny_params, shots, key, config, workdir=tmp_path / "a"
  )

  # Interrupted after 2 steps, then run again with the full budget.
  first_two = train_config(steps=2, checkpoint_every=2)
  few_shot.adapt(tiny_mae, tiny_params, shots, key, first_two, workdir=tmp_path / "b")
  resumed, resumed_history = few_shot.adapt(
    tiny_mae, tiny_params, shots, key, config, workdir=tmp_path / "b"
  )
  assert resumed_history["start_step"] == 2 and resumed_history["step"] == [3, 4]
  assert resumed_history["loss"] == history["loss"][2:]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(merged))

  # The merged model is a converted checkpoint that the loader reads back.
  model, loaded = checkpoints.load_mae(tmp_path / "b" / few_shot.MERGED_DIR)
  assert model.embed_dim == tiny_mae.embed_dim and model.depth == tiny_mae.depth
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(merged))
  assert sorted(p.name for p in (tmp_path / "b" / few_shot.CHECKPOINT_DIR).iterdir()) == ["2", "4"]

  # A finished run asked for fewer steps, or another seed on the same workdir: refused.
  with pytest.raises(ValueError, match="already at step 4"):
    few_shot.adapt(tiny_mae, tiny_params, shots, key, train_config(steps=3), workdir=tmp_path / "b")
  with pytest.raises(ValueError, match="different PRNG key"):
    few_shot.adapt(tiny_mae, tiny_params, shots, jax.random.key(6), config, workdir=tmp_path / "b")


def test_full_finetuning_trains_everything_but_the_position_tables(
  tiny_params, tiny_mae, train_config
):
  before = _flat(tiny_params)
  placed = parallel.replicate(tiny_params, parallel.data_mesh())  # as a caller would hold them
  config = train_config(steps=2, finetune="full")
  merged, history = few_shot.adapt(tiny_mae, placed, _textures(0, 2), jax.random.key(7), config)
  after = _flat(merged)
  frozen = {"pos_embed", "decoder_pos_embed"}
  assert history["trainable_params"] == models.num_params(tiny_params) - sum(
    before[name].size for name in frozen
  )
  for path, value in before.items():
    if path in frozen:
      np.testing.assert_array_equal(after[path], value)
    else:
      assert not np.array_equal(after[path], value), path
  # The caller's parameters were copied, not donated to the step.
  assert not any(x.is_deleted() for x in jax.tree.leaves(placed))
  jax.tree.map(np.testing.assert_array_equal, _flat(placed), before)


def test_inputs_are_checked(tiny_params, tiny_mae, train_config):
  with pytest.raises(ValueError, match=r"Expected images of shape \(k, 32, 32, 3\)"):
    few_shot.adapt(tiny_mae, tiny_params, np.zeros((2, 64, 64, 3), np.uint8), jax.random.key(0))
  with pytest.raises(ValueError, match="multiple of the number of devices"):
    few_shot.adapt(
      tiny_mae,
      tiny_params,
      _textures(0, 1),
      jax.random.key(0),
      train_config(steps=1, batch_size=12),
    )

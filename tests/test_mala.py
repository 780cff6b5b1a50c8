"""MALA: Token Balance shapes, frozen encoder, stage-2 learning, resume, scoring, the job."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from maeday_jax import checkpoints, data, models, parallel
from maeday_jax.mala import segmenter as seg
from maeday_jax.mala import stage2
from maeday_jax.pretrain import augmentation, optim
from maeday_jax.pretrain import step as step_lib

from .conftest import kill_at_step


@pytest.fixture(scope="module")
def segmenter_and_params(tiny_mae):
  segmenter = seg.Segmenter(tiny_mae)
  mae_params = models.init_params(tiny_mae, jax.random.key(0))
  return segmenter, seg.segmenter_params(segmenter, mae_params, jax.random.key(1))


def test_token_balance_shapes(segmenter_and_params, tiny_mae):
  segmenter, params = segmenter_and_params
  images = jnp.zeros((3, 32, 32, 3))
  logits = segmenter.apply({"params": params}, images)
  assert logits.shape == (3, 32, 32, 2) and logits.dtype == jnp.float32
  # Equation 5: [first, last] encoder tokens (2 x 64) -> decoder width (32); then
  # [balanced, decoder] (2 x 32) -> p x p x 2 per patch.
  assert params["token_balance_encoder"]["kernel"].shape == (128, 32)
  assert params["token_balance_head"]["kernel"].shape == (64, 8 * 8 * 2)
  first, last = tiny_mae.apply(
    {"params": params["mae"]},
    images,
    jnp.broadcast_to(jnp.arange(16), (3, 16)),
    method=tiny_mae.encode_tokens,
  )
  assert first.shape == last.shape == (3, 17, 64)


def test_encoder_is_frozen_and_decoder_trains(segmenter_and_params):
  segmenter, params = segmenter_and_params
  frozen, trainable = seg.split_frozen(params)
  frozen_names = {p[1] for p in traverse_util.flatten_dict(frozen)}
  assert {"patch_embed", "cls_token", "blocks_0", "blocks_1", "norm"} <= frozen_names
  assert "decoder_pos_embed" in frozen_names  # Fixed table: never trained.
  trained = traverse_util.flatten_dict(trainable)
  assert any(p[:2] == ("mae", "decoder_blocks_0") for p in trained)
  assert ("token_balance_head", "kernel") in trained
  assert not any(p[1].startswith("blocks_") for p in trained if p[0] == "mae")
  merged = seg.merge(frozen, trainable)
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_pooled_max_by_hand():
  maps = np.zeros((2, 6, 6), np.float32)
  maps[0, 1:3, 1:3] = 1.0  # A 2 x 2 defect: fully inside one 2 x 2 window.
  maps[1, 5, 5] = 1.0  # One hot pixel: 1/4 of a 2 x 2 window at best.
  np.testing.assert_allclose(seg.pooled_max(jnp.asarray(maps), 2), [1.0, 0.25])
  # k = 3: the 2 x 2 defect fills 4 of 9 pixels of the best window.
  np.testing.assert_allclose(seg.pooled_max(jnp.asarray(maps), 3), [4 / 9, 1 / 9], rtol=1e-6)
  # A window larger than the map is clipped to it (the mean of the whole map).
  np.testing.assert_allclose(seg.pooled_max(jnp.asarray(maps), 100), [4 / 36, 1 / 36], rtol=1e-6)


def test_synthetic_batch_masks_and_grey_textures():
  images = np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None, None], (4, 1, 32, 3))
  config = stage2.SyntheticConfig(anomaly_prob=1.0, grayscale=True)
  inputs_, masks = jax.jit(stage2.synthetic_batch, static_argnums=2)(
    jax.random.key(0), jnp.asarray(images), config, None
  )
  assert inputs_.shape == (4, 32, 32, 3) and masks.shape == (4, 32, 32)
  assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
  # Grey images with grey textures stay grey (in [0, 1] before normalisation).
  from maeday_jax import imagenet

  pixels = np.asarray(inputs_) * imagenet.IMAGENET_STD + imagenet.IMAGENET_MEAN
  np.testing.assert_allclose(pixels[..., 0], pixels[..., 1], atol=1e-5)


def _spec(segmenter, steps):
  optimizer = optim.OptimizerConfig(peak_lr=1e-3, total_steps=steps, warmup_steps=1)
  return stage2.Stage2Spec(segmenter, optimizer, stage2.SyntheticConfig(anomaly_prob=1.0))


def test_a_few_stage2_steps_lower_the_loss(segmenter_and_params):
  segmenter, params = segmenter_and_params
  frozen, trainable = seg.split_frozen(params)
  spec = _spec(segmenter, 30)
  mesh = parallel.data_mesh()
  images = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
  # One fixed synthetic batch to measure on (the training batches differ every step).
  fixed_inputs, fixed_masks = stage2.synthetic_batch(
    jax.random.key(5), jnp.asarray(images), spec.synthetic
  )

  def loss(trainable):
    return float(stage2.stage2_loss(spec, trainable, frozen, fixed_inputs, fixed_masks)[0])

  before = loss(trainable)
  state = parallel.replicate(
    {
      "params": trainable,
      "opt_state": spec.optimizer.make().init(trainable),
      "step": jnp.zeros((), jnp.int32),
    },
    mesh,
  )
  step = stage2.make_step(spec, mesh)
  frozen_r = parallel.replicate(frozen, mesh)
  bank = parallel.replicate(jnp.zeros((1, 32, 32, 3), jnp.uint8), mesh)
  batch = parallel.shard_batch(images, mesh)
  for _ in range(30):
    state, metrics = step(state, frozen_r, bank, batch, jax.random.key(7))
  assert np.isfinite(float(metrics["loss"]))
  after = loss(jax.device_get(state["params"]))
  assert after < 0.8 * before, (before, after)


def test_stage1_loss_terms_switch_and_the_predictor_trains(tiny_mae):
  images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  params = models.init_params(tiny_mae, jax.random.key(1))
  noise = jax.random.uniform(jax.random.key(2), (4, 16))
  plain = step_lib.LossConfig(loss="all")
  base, (terms, recon) = step_lib.reconstruction_loss(tiny_mae, params, images, noise, plain)
  assert set(terms) == {"pixel"} and recon is None
  np.testing.assert_allclose(base, step_lib.mae_loss(tiny_mae, params, images, noise, plain))
  mala = step_lib.LossConfig(loss="all", pixel_loss="l1", ssim_weight=1.0)
  total, (terms, recon) = step_lib.reconstruction_loss(tiny_mae, params, images, noise, mala)
  pred = tiny_mae.apply({"params": params}, images, noise=noise)
  l1 = np.abs(np.asarray(pred) - np.asarray(tiny_mae.patchify(images))).mean()
  np.testing.assert_allclose(terms["pixel"], l1, rtol=1e-5)
  np.testing.assert_allclose(total, terms["pixel"] + terms["ssim"], rtol=1e-6)
  assert recon.shape == (4, 32, 32, 3)
  with pytest.raises(ValueError, match="norm_pix_loss"):
    step_lib.LossConfig(norm_pix_loss=True, ssim_weight=1.0)
  with pytest.raises(ValueError, match="pixel_loss"):
    step_lib.LossConfig(pixel_loss="huber")


def _tiny_mala_config(fake_tiles, data_dir, runlocal_config):
  config = runlocal_config
  config.data.name = "magnetic_tile"
  config.data.path = str(fake_tiles)
  config.data.splits = "train,test"
  config.data.data_dir = str(data_dir)
  config.extra_data = []
  config.eval.data.name = "magnetic_tile"
  config.eval.data.path = str(fake_tiles)
  config.eval.data.data_dir = str(data_dir)
  config.stage1.steps = 2
  config.stage2.steps = 4
  config.checkpoint_every = 2
  config.eval.outputs.overlays = False
  config.eval.outputs.panels = 1
  config.eval.outputs.roc = False
  return config


@pytest.mark.parametrize("read", [("load_size", 48), ("load_short_side", 40)])
def test_stage2_resume_equals_uninterrupted(fake_tiles, tmp_path, monkeypatch, tiny_mae, read):
  from maeday_jax import defaults

  config = _tiny_mala_config(fake_tiles, tmp_path / "tfds", defaults.mala_config("runlocal"))
  mae_dir = tmp_path / "mae"
  checkpoints.orbax_format.save(
    mae_dir, models.architecture(tiny_mae), models.init_params(tiny_mae, jax.random.key(3))
  )
  # Trained on random 32 px tiles of 48 px images, or (load_short_side) of the images
  # with their aspect ratio kept, cut on the host: a resumed run draws the same tiles.
  config.stage2[read[0]] = read[1]
  section = {k: config[k] for k in ("seed", "model", "data", "checkpoint_every", "log_every")}
  import ml_collections

  stage = ml_collections.ConfigDict({**section, "extra_data": [], "train": config.stage2})
  whole = stage2.train(stage, tmp_path / "whole", str(mae_dir))
  kill_at_step(monkeypatch, 3, lambda: stage2.train(stage, tmp_path / "resumed", str(mae_dir)))
  resumed = stage2.train(stage, tmp_path / "resumed", str(mae_dir))
  assert whole["steps"] == 4 and resumed["resumed_from_step"] == 2
  _, a = stage2.load_segmenter(tmp_path / "whole" / stage2.SEGMENTER_DIR)
  _, b = stage2.load_segmenter(tmp_path / "resumed" / stage2.SEGMENTER_DIR)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  assert {"l1", "focal", "loss"} <= set(records[-1])


def test_random_tiles_are_whole_pixel_windows_of_each_image():
  images = np.random.default_rng(0).integers(0, 256, size=(5, 20, 24, 3), dtype=np.uint8)
  draw = jax.jit(lambda k, x: augmentation.random_tiles(k, x, 8))
  tiles = np.asarray(draw(jax.random.key(1), images))
  assert tiles.shape == (5, 8, 8, 3) and tiles.dtype == np.uint8
  corners = set()
  for image, tile in zip(images, tiles, strict=True):
    found = [
      (y, x)
      for y in range(20 - 8 + 1)
      for x in range(24 - 8 + 1)
      if np.array_equal(image[y : y + 8, x : x + 8], tile)
    ]
    assert found
    corners.add(found[0])
  assert len(corners) > 1


def test_the_job_trains_both_stages_and_reports_both_methods(fake_tiles, tmp_path):
  from maeday_jax import defaults
  from maeday_jax.jobs import mala as job

  config = _tiny_mala_config(fake_tiles, tmp_path / "tfds", defaults.mala_config("runlocal"))
  result = job.run(config, tmp_path / "run")
  table = (tmp_path / "run" / "comparison.md").read_text()
  assert "| MALA | magnetic_tile |" in table and "MAEDAY" in table
  scores = (tmp_path / "run" / "mala" / "scores.csv").read_text().splitlines()
  test_split = data.load_split(config.eval.data, "magnetic_tile", "test")
  assert len(scores) == 1 + len(test_split)  # Header + every test image.
  assert result["stage1"]["steps"] == 2 and result["stage2"]["steps"] == 4
  stage1_log = [json.loads(line) for line in (tmp_path / "run" / "stage1" / "metrics.jsonl").open()]
  assert {"loss_pixel", "loss_ssim", "loss_adversarial", "loss_predictor"} <= set(stage1_log[-1])


def test_bad_settings_are_refused():
  from maeday_jax import defaults
  from maeday_jax.config_errors import ConfigError
  from maeday_jax.jobs import mala as job

  config = defaults.mala_config("runlocal")
  config.stage1.steps = 0
  config.stage1.epochs = 0.0
  with pytest.raises(ConfigError, match="stage1.epochs"):
    job.validate(config)
  config = defaults.mala_config("runlocal")
  config.stage2.synthetic.textures = "images,marble"
  with pytest.raises(ConfigError, match="textures"):
    job.validate(config)
  config.stage2.synthetic.textures = "folder"
  with pytest.raises(ConfigError, match="texture_dir"):
    job.validate(config)
  config = defaults.mala_config("runlocal")
  config.stage2.load_size = -1
  with pytest.raises(ConfigError, match="stage2.load_size"):
    job.validate(config)


def test_each_device_draws_its_own_defects():
  """Inside the training step the generator runs per device (no collectives): the same
  image on every device must still get a different defect on each."""
  mesh = parallel.data_mesh()
  devices = mesh.devices.size
  image = np.random.default_rng(1).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
  config = stage2.SyntheticConfig(anomaly_prob=1.0, threshold=0.3)
  per_device = jax.jit(stage2.per_device_draw(config, mesh))
  batch = parallel.shard_batch(np.repeat(image, devices, axis=0), mesh)
  _, masks = per_device(jax.random.key(0), batch, None)
  masks = np.asarray(masks).reshape(devices, -1)
  assert masks.shape[0] == devices and masks.max() > 0
  distinct = {m.tobytes() for m in masks}
  assert len(distinct) == devices
  # On one device the per-device draw is the whole batch's draw.
  one = parallel.data_mesh(jax.devices()[:1])
  images = np.random.default_rng(2).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
  single = jax.jit(stage2.per_device_draw(config, one))
  inputs_a, masks_a = single(jax.random.key(3), parallel.shard_batch(images, one), None)
  inputs_b, masks_b = stage2.synthetic_batch(jax.random.key(3), jnp.asarray(images), config)
  np.testing.assert_allclose(masks_a, masks_b, atol=1e-6)
  np.testing.assert_allclose(inputs_a, inputs_b, atol=1e-5)

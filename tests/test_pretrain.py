"""MAE pre-training: schedule, decay mask, augmentation, learning, resume and export."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from maeday_jax import checkpoints, imagenet, model_builder, models, parallel
from maeday_jax.jobs import pretrain as pretrain_job
from maeday_jax.pretrain import augmentation, inputs, loop, optim
from maeday_jax.pretrain import step as step_lib

from .conftest import kill_at_step


def test_learning_rate_schedule_matches_its_formula():
  peak = optim.peak_learning_rate(1.5e-4, 512)
  assert peak == pytest.approx(3e-4)
  schedule = optim.learning_rate_schedule(peak, total_steps=100, warmup_steps=10, min_lr=1e-6)
  for step in range(0, 101):
    expected = optim.reference_learning_rate(step, peak, 100, 10, 1e-6)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12), step
  # Written out once more: 0 at the start, the peak after warm-up, half-way down the cosine.
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(peak / 2)
  assert float(schedule(10)) == pytest.approx(peak)
  assert float(schedule(55)) == pytest.approx(
    1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi / 2))
  )
  assert float(schedule(100)) == pytest.approx(1e-6)


def test_weight_decay_mask_covers_exactly_the_kernels(tiny_mae):
  flat = traverse_util.flatten_dict(optim.decay_mask(models.param_shapes(tiny_mae)))
  decayed = {"/".join(path) for path, on in flat.items() if on}
  expected = {"patch_embed/proj/kernel", "decoder_embed/kernel", "decoder_pred/kernel"}
  for stack, depth in (("blocks", tiny_mae.depth), ("decoder_blocks", tiny_mae.decoder_depth)):
    for i in range(depth):
      for layer in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"):
        expected.add(f"{stack}_{i}/{layer}/kernel")
  assert decayed == expected
  # Everything else is a bias, a LayerNorm parameter, a token or a position embedding.
  for path, on in flat.items():
    if not on:
      assert path[-1] in (
        "bias",
        "scale",
        "cls_token",
        "mask_token",
        "pos_embed",
        "decoder_pos_embed",
      ), path


def test_optimizer_never_moves_position_embeddings_and_decays_kernels(tiny_mae):
  params = models.param_shapes(tiny_mae)
  optimizer = optim.make_optimizer(optax.constant_schedule(0.1), weight_decay=0.5)

  @jax.jit
  def decay_only():  # Non-zero weights, zero gradients: only the weight decay acts.
    weights = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), params)
    zero_grads = jax.tree.map(jnp.zeros_like, weights)
    return optimizer.update(zero_grads, optimizer.init(weights), weights)[0]

  flat = traverse_util.flatten_dict(decay_only())
  for path, update in flat.items():
    moved = bool(jnp.any(update != 0))
    assert moved == (path[-1] == "kernel"), path


def test_full_crop_without_flips_is_the_identity():
  image = np.random.default_rng(1).uniform(size=(16, 16, 3)).astype(np.float32)
  whole = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=False)
  out = jax.jit(lambda k, x: augmentation.augment_image(k, x, 16, **whole))(
    jax.random.key(2), image
  )
  np.testing.assert_allclose(out, image, atol=1e-5)
  # A crop of half the area is half the side and lies inside the image.
  box = augmentation.sample_crop(jax.random.key(3), (20, 30), (0.5, 0.5), (1.0, 1.0))
  assert float(box.height * box.width) == pytest.approx(300.0, rel=1e-5)
  assert 0 <= float(box.top) <= 20 - float(box.height)


def test_tile_crops_are_whole_pixel_windows_at_the_images_resolution():
  """`crop='tile'`: each image's crop is an exact window of the model's size (no
  resampling) at a random position, different across images, flips aside."""
  images = np.random.default_rng(4).integers(0, 256, size=(6, 40, 48, 3), dtype=np.uint8)
  out = jax.jit(lambda k, x: augmentation.augment_batch(k, x, 16, crop="tile", hflip=False))(
    jax.random.key(5), images
  )
  normalised = np.asarray(imagenet.normalize(images))
  corners = set()
  for image, tile in zip(normalised, np.asarray(out), strict=True):
    found = [
      (y, x)
      for y in range(40 - 16 + 1)
      for x in range(48 - 16 + 1)
      if np.allclose(image[y : y + 16, x : x + 16], tile, atol=1e-5)
    ]
    assert found, "a tile is not a window of its image"
    corners.add(found[0])
  assert len(corners) > 1


def test_batch_order_is_a_function_of_seed_and_step():
  first = [inputs.batch_indices(10, 4, s, seed=0) for s in range(4)]
  again = [inputs.batch_indices(10, 4, s, seed=0) for s in range(4)]
  assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
  # One epoch (2 full batches of 4) draws 8 distinct images.
  assert len(set(np.concatenate(first[:2]).tolist())) == 8
  assert len(inputs.batch_indices(3, 8, 0, seed=0)) == 8  # Tiny sets are repeated.


def test_a_few_steps_lower_the_loss(tiny_mae):
  mesh = parallel.data_mesh()
  spec = step_lib.TrainSpec(
    model=tiny_mae,
    optimizer=optim.OptimizerConfig(peak_lr=3e-3, total_steps=1000, warmup_steps=0),
    augment=(("crop_scale", (1.0, 1.0)), ("hflip", False)),
  )
  # Smooth images (a few low-frequency waves): learnable from the visible quarter.
  grid = np.linspace(0, 1, 32)
  phases = np.random.default_rng(0).uniform(0, 6, (8, 3))
  waves = [np.sin(6 * grid[:, None] + a) + np.cos(5 * grid[None] + b) + c for a, b, c in phases]
  images = np.stack([np.stack([w] * 3, -1) for w in waves])
  images_u8 = np.clip((images + 3) * 40, 0, 255).astype(np.uint8)
  params = jax.jit(lambda k: models.init_params(tiny_mae, k))(jax.random.key(0))
  state = step_lib.replicated_init_state(params, spec, mesh)
  train_step = step_lib.make_train_step(spec, mesh)
  assert step_lib.make_train_step(spec, mesh) is train_step  # Compiled once per spec.
  noise = jax.random.uniform(jax.random.key(9), (8, tiny_mae.num_patches))
  normalised = augmentation.normalize(jnp.asarray(images_u8))

  @jax.jit
  def held_out(params):
    return step_lib.mae_loss(tiny_mae, params, normalised, noise, spec.loss)

  def held_out_loss(params):
    return float(held_out(params))

  before = held_out_loss(state["params"])
  batch = parallel.shard_batch(images_u8, mesh)
  for _ in range(12):
    state, metrics = train_step(state, batch, jax.random.key(0))
  assert int(state["step"]) == 12
  assert np.isfinite(float(metrics["loss"]))
  assert held_out_loss(state["params"]) < 0.7 * before


class _FixedPrediction:
  """Stands in for the MAE in the loss: returns a given prediction, patchifies like it."""

  def __init__(self, pred):
    self.pred = pred

  def apply(self, variables, images, noise, mask_ratio):
    return self.pred

  def patchify(self, images):
    return models.patches.patchify(images, 8)


def test_loss_options():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  pred = rng.normal(size=(2, 16, 192)).astype(np.float32)
  noise = rng.uniform(size=(2, 16)).astype(np.float32)
  model = _FixedPrediction(pred)
  per_patch = ((pred - np.asarray(model.patchify(images))) ** 2).mean(-1)
  removed = np.argsort(np.argsort(noise, -1), -1) >= 4  # 4 of the 16 patches are kept.
  masked = step_lib.mae_loss(model, None, images, noise, step_lib.LossConfig())
  every = step_lib.mae_loss(model, None, images, noise, step_lib.LossConfig(loss="all"))
  np.testing.assert_allclose(masked, per_patch[removed].mean(), rtol=1e-5)
  np.testing.assert_allclose(every, per_patch.mean(), rtol=1e-5)
  normalised = step_lib.patch_targets(model, images, norm_pix_loss=True)
  np.testing.assert_allclose(normalised.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(normalised.std(-1), 1.0, atol=1e-3)
  with pytest.raises(ValueError, match="train.loss"):
    step_lib.LossConfig(loss="some")


def _params(workdir):
  _, params = checkpoints.load_mae(workdir / loop.MODEL_DIR)
  return params


def test_resume_equals_uninterrupted_and_exports_a_loadable_model(
  fake_tiles, tmp_path, monkeypatch, job_config
):
  config = job_config(
    "pretrain",
    "runlocal",
    data={
      "name": "magnetic_tile",
      "path": fake_tiles,  # 10 normal tiles.
      "splits": "train,test",  # Every normal image; the defects are left out.
      "data_dir": tmp_path / "tfds",
    },
    train={"steps": 4},
    checkpoint_every=2,
  )
  # The job (settings checked, config.json written) around the library's `loop.train`.
  whole = pretrain_job.run(config, tmp_path / "whole")
  assert whole["steps"] == 4 and whole["num_images"] == 10
  assert whole["architecture"]["img_size"] == 32
  assert (tmp_path / "whole" / "config.json").is_file()

  # Kill the second run when it asks for the batch of step 3 (after the step-2 save).
  kill_at_step(monkeypatch, 3, lambda: loop.train(config, tmp_path / "resumed"))
  resumed = loop.train(config, tmp_path / "resumed")
  assert resumed["resumed_from_step"] == 2

  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    _params(tmp_path / "whole"),
    _params(tmp_path / "resumed"),
  )
  # One record per step, in order, despite the repeated step 3.
  records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").open()]
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  whole_records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").open()]
  np.testing.assert_allclose(
    [r["loss"] for r in records], [r["loss"] for r in whole_records], rtol=1e-5
  )
  assert (tmp_path / "resumed" / "training.png").stat().st_size > 0

  # The export is a checkpoint to continue from (`--config.model.checkpoint`).
  model_config = config.model.copy_and_resolve_references()
  model_config.checkpoint = str(tmp_path / "whole" / loop.MODEL_DIR)
  model, _, source = model_builder.build_model(model_config, jax.random.key(0))
  assert source == model_config.checkpoint
  assert models.architecture(model) == whole["architecture"]
  model_config.embed_dim = 32
  with pytest.raises(ValueError, match="contradict"):
    model_builder.build_model(model_config, jax.random.key(0))


def test_pretraining_on_tiles_at_the_images_own_size(fake_tiles, tmp_path, job_config):
  """`train.load_short_side=-1`: each step a random model-size window of each image at its
  own size (cut on the host), crops of the windows as usual."""
  config = job_config(
    "pretrain",
    "runlocal",
    data={"name": "magnetic_tile", "path": fake_tiles, "data_dir": tmp_path / "tfds"},
    train={"steps": 2, "load_short_side": -1},
    checkpoint_every=2,
  )
  summary = pretrain_job.run(config, tmp_path / "run")
  assert summary["steps"] == 2 and summary["num_images"] > 0
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)


def test_configs_build(job_config):
  for name in ("pretrain", "pretrain_mt"):
    for arg in (None, "runlocal"):
      config = job_config(name, arg)
      assert config.job == "pretrain"
      assert config.model.checkpoint == "random"
      assert config.train.loss in step_lib.LOSSES
  mt = job_config("pretrain_mt", None)
  assert mt.model.img_size == 112 and mt.eval.enabled
  assert [s.splits for s in [mt.data, *mt.extra_data]] == ["train,test", "train"]


def test_the_job_refuses_bad_settings_before_any_work(tmp_path, job_config):
  from maeday_jax.config_errors import ConfigError

  for field, value, named in (
    ("loss", "some", "train.loss"),
    ("pixel_loss", "l3", "train.pixel_loss"),
    ("steps", 0, "train.epochs"),
    ("augment.crop", "square", "train.augment.crop"),
    ("augment.crop", "tile", "train.load_size"),
    ("load_short_side", -3, "train.load_short_side"),
  ):
    config = job_config("pretrain", "runlocal")
    node, leaf = (
      (config.train.augment, "crop") if field == "augment.crop" else (config.train, field)
    )
    node[leaf] = value
    if field == "steps":
      config.train.epochs = 0.0
    with pytest.raises(ConfigError, match=named):
      pretrain_job.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()

"""MALA stage 2: the decoder and the Token Balance Module learn to segment synthetic defects.

The MAE encoder (from stage 1) is frozen; every step draws DRAEM-style anomalies on the
normal training images on device (`mala.synthetic`: Perlin masks filled with a blend of
a foreign texture) and trains the segmenter with `l1_weight * L1 + focal_weight * focal`
between its defect probability and the synthetic mask.

Files under the stage's work directory: `checkpoints/` (resumable; rerunning resumes),
`metrics.jsonl` and `training.png` (loss terms), `segmenter/` (the trained model:
`mae/`, loadable by `checkpoints.load_mae`, and `token_balance/`), `summary.json`.

    summary = stage2.train(config, workdir, mae_checkpoint)
    segmenter, params = stage2.load_segmenter(workdir / stage2.SEGMENTER_DIR)

`save_segmenter` / `load_segmenter` live beside this stage (`mala.segmenter_io`) and
are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maeday_jax import checkpoints, imagenet, model_builder, parallel, training
from maeday_jax.config_errors import ConfigError
from maeday_jax.mala import synthetic
from maeday_jax.mala.segmenter_io import load_segmenter, save_segmenter
from maeday_jax.models.segmenter import Segmenter, merge, segmenter_params, split_frozen
from maeday_jax.objectives import losses
from maeday_jax.pretrain import augmentation, inputs, loop, optim

__all__ = [
  "SEGMENTER_DIR",
  "TEXTURE_SOURCES",
  "Stage2Spec",
  "SyntheticConfig",
  "load_segmenter",
  "make_step",
  "per_device_draw",
  "save_segmenter",
  "stage2_loss",
  "synthetic_batch",
  "train",
]

logger = logging.getLogger(__name__)

TEXTURE_SOURCES = ("images", "procedural", "folder")
SEGMENTER_DIR = "segmenter"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """How synthetic defects are drawn (see `mala.synthetic.synthesize`).

  Attributes:
    anomaly_prob: share of training images that get a defect.
    beta_range: opacity range of the image inside the defect (0 = pure texture).
    threshold: Perlin threshold (higher: smaller defects).
    textures: sources the foreign texture of each defect is drawn from, uniformly:
      'images' (other normal images of the batch, moved and recoloured), 'procedural'
      (noise, stripes, checkerboards, dots) and 'folder' (a texture folder, e.g. DTD).
    foreground: restrict defects to a heuristic foreground (object categories).
    foreground_threshold: grey difference from the border that counts as foreground.
    hflip, vflip: random flips of the normal images first.
    grayscale: make every texture grey (set when the training images are grey: a
      coloured defect would teach the segmenter that colour is the defect).
  """

  anomaly_prob: float = 0.5
  beta_range: tuple[float, float] = (0.0, 0.8)
  threshold: float = 0.5
  textures: tuple[str, ...] = ("images", "procedural")
  foreground: bool = False
  foreground_threshold: float = 0.1
  hflip: bool = True
  vflip: bool = True
  grayscale: bool = False


@dataclasses.dataclass(frozen=True)
class Stage2Spec:
  """What the compiled stage-2 step depends on (hashable: the step is cached on it)."""

  segmenter: Segmenter
  optimizer: optim.OptimizerConfig
  synthetic: SyntheticConfig = SyntheticConfig()
  l1_weight: float = 1.0
  focal_weight: float = 1.0
  focal_gamma: float = 2.0
  # > 0: the training images are larger (`load_size`) and each step takes a random tile
  # of this size from each, at their resolution, as tiled scoring cuts them.
  tile_size: int = 0


# Folded into the run's key for the tiles' positions: a stream apart from the defects'.
_TILE_STREAM = 0x7119


def _flip(key: jax.Array, images: jax.Array, axis: int) -> jax.Array:
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, jnp.flip(images, axis=axis), images)


def synthetic_batch(
  key: jax.Array,
  images_u8: jax.Array,
  config: SyntheticConfig,
  bank=None,
  axis_name: str | None = None,
):
  """(model inputs (B, H, W, 3) normalised, defect masks (B, H, W)) of normal images.

  With `axis_name` it runs per device inside `shard_map` over the batch (as the training
  step does): each shard draws its own flips and defects (the key folded with the shard
  index), and the 'images' textures come from the other images of the shard (from the
  image itself, moved and recoloured, when a device holds one image). Nothing crosses
  devices. `per_device_draw` wraps it so.
  """
  if axis_name is not None and jax.lax.axis_size(axis_name) > 1:
    # Several devices: each its own draw. One device draws what the whole batch would.
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  k_h, k_v, k_source, k_tex, k_syn = jax.random.split(key, 5)
  if config.hflip:
    images_u8 = _flip(k_h, images_u8, 2)
  if config.vflip:
    images_u8 = _flip(k_v, images_u8, 1)
  images = images_u8.astype(jnp.float32) / 255.0
  batch, size = images.shape[0], images.shape[1:3]
  tex_keys = jax.random.split(k_tex, len(config.textures))
  candidates = []
  for source, k in zip(config.textures, tex_keys, strict=True):
    if source == "images":
      candidates.append(_image_textures(k, images))
    elif source == "procedural":
      candidates.append(synthetic.procedural_textures(k, batch, size))
    else:
      candidates.append(synthetic.textures_from_bank(k, bank, batch))
  choice = jax.random.randint(k_source, (batch,), 0, len(candidates))
  textures = jnp.stack(candidates)[choice, jnp.arange(batch)]
  if config.grayscale:
    textures = jnp.broadcast_to(textures.mean(axis=-1, keepdims=True), textures.shape)
  foreground = (
    synthetic.foreground_mask(images, config.foreground_threshold) if config.foreground else None
  )
  anomalous, masks = synthetic.synthesize(
    k_syn,
    images,
    textures,
    foreground=foreground,
    anomaly_prob=config.anomaly_prob,
    beta_range=tuple(config.beta_range),
    threshold=config.threshold,
  )
  return imagenet.normalize(anomalous * 255.0), masks


def _image_textures(key: jax.Array, images: jax.Array) -> jax.Array:
  """Textures cut from the other images of the block, or from the image itself (moved,
  turned, recoloured) when the block has one image."""
  if images.shape[0] < 2:
    return synthetic.texture_views(key, images)
  return synthetic.textures_from_images(key, images)


def per_device_draw(config: SyntheticConfig, mesh):
  """`draw(key, images_u8, bank) -> (inputs, masks)`: `synthetic_batch` run by each device
  of `mesh` on its own rows (batch-split in and out; key and bank replicated). Call it
  inside `jax.jit`."""
  rows, every = jax.sharding.PartitionSpec(parallel.DATA_AXIS), jax.sharding.PartitionSpec()

  def draw(key, images_u8, bank):
    return synthetic_batch(key, images_u8, config, bank, axis_name=parallel.DATA_AXIS)

  return parallel.per_shard(draw, mesh, (every, rows, every), (rows, rows))


def stage2_loss(spec: Stage2Spec, trainable, frozen, images, masks):
  """(total loss, its terms) of the segmenter on a batch with defect masks."""
  logits = spec.segmenter.apply({"params": merge(frozen, trainable)}, images)
  l1 = losses.segmentation_l1(logits, masks)
  focal = losses.focal_loss(logits, masks, gamma=spec.focal_gamma)
  return spec.l1_weight * l1 + spec.focal_weight * focal, {"l1": l1, "focal": focal}


@functools.lru_cache(maxsize=4)
def make_step(spec: Stage2Spec, mesh):
  """`step(state, frozen, bank, images_u8, key) -> (state, metrics)` over `mesh`.

  `images_u8` is split over the data axis; the rest is replicated; the state is donated.
  Step t's randomness is `fold_in(key, t)` and the example's row, so a resumed run
  repeats an uninterrupted one (on the same number of devices).

  Two compiled programs per step: the synthetic defects, drawn on each device for its
  own rows (`per_device_draw`), then the update. Compiled
  as one program with a few images per device, XLA:CPU fuses the generator's long
  integer-hash chains into the gradient's kernels and takes many minutes to compile
  them; apart, each compiles in seconds, and the batch never leaves the devices.
  """
  optimizer, schedule = spec.optimizer.make(), spec.optimizer.schedule()
  whole, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  per_device = per_device_draw(spec.synthetic, mesh)

  @functools.partial(jax.jit, in_shardings=(whole, whole, data, whole), out_shardings=data)
  def draw(key, step, images_u8, bank):
    if spec.tile_size:
      tiles_key = jax.random.fold_in(jax.random.fold_in(key, _TILE_STREAM), step)
      images_u8 = augmentation.random_tiles(tiles_key, images_u8, spec.tile_size)
    return per_device(jax.random.fold_in(key, step), images_u8, bank)

  def update(state, frozen, images, masks):
    (loss, terms), grads = jax.value_and_grad(stage2_loss, argnums=1, has_aux=True)(
      spec, state["params"], frozen, images, masks
    )
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "loss": loss,
      **terms,
      "defect_fraction": masks.mean(),
      "learning_rate": schedule(state["step"]),
      "grad_norm": optax.tree.norm(grads),
    }
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  update = jax.jit(
    update,
    in_shardings=(whole, whole, data, data),
    out_shardings=(whole, whole),
    donate_argnums=0,
  )

  # One program in flight at a time on several CPU devices: there XLA:CPU can miss the
  # update's gradient all-reduce (and abort) while another program is queued on some of
  # them. Accelerators keep dispatching ahead.
  wait_for_draw = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"

  def step(state, frozen, bank, images_u8, key):
    images, masks = draw(key, state["step"], images_u8, bank)
    if wait_for_draw:
      jax.block_until_ready(masks)
    return update(state, frozen, images, masks)

  return step


def _spec(
  config,
  segmenter: Segmenter,
  total: int,
  warmup: int,
  grayscale: bool = False,
  tile_size: int = 0,
) -> Stage2Spec:
  train = config.train
  syn = train.synthetic
  return Stage2Spec(
    segmenter=segmenter,
    optimizer=optim.OptimizerConfig.from_train(train, train.lr, total, warmup),
    synthetic=SyntheticConfig(
      anomaly_prob=float(syn.anomaly_prob),
      beta_range=tuple(float(v) for v in syn.beta_range),
      threshold=float(syn.threshold),
      textures=tuple(_split(syn.textures)),
      foreground=bool(syn.foreground),
      foreground_threshold=float(syn.foreground_threshold),
      hflip=bool(syn.hflip),
      vflip=bool(syn.vflip),
      grayscale=grayscale,
    ),
    l1_weight=float(train.l1_weight),
    focal_weight=float(train.focal_weight),
    focal_gamma=float(train.focal_gamma),
    tile_size=tile_size,
  )


def _split(value) -> list[str]:
  names = value.split(",") if isinstance(value, str) else list(value)
  return [n.strip() for n in names if n.strip()]


def _texture_bank(syn, size: int) -> np.ndarray:
  if "folder" not in _split(syn.textures):
    return np.zeros((1, size, size, 3), np.uint8)
  return synthetic.load_texture_folder(syn.texture_dir, size, syn.get("max_textures") or None)


def train(config: ml_collections.ConfigDict, workdir, mae_checkpoint: str) -> dict:
  """Trains the segmenter on `config`, starting from the MAE at `mae_checkpoint`.

  `config` is a `defaults.mala_stage2_config()`-shaped section with `model`, `data`,
  `extra_data`, `seed` and `checkpoint_every`. Everything goes under `workdir`
  (created when missing): checkpoints (a rerun resumes from the newest), metrics,
  `segmenter/` (`load_segmenter` reads it) and `summary.json`. Returns that summary:
  steps, the step it resumed from, final loss, timings and `segmenter_dir`.
  """
  wall_start = time.perf_counter()
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = parallel.data_mesh()
  settings = config.train
  parallel.local_batch_size(settings.batch_size, mesh)
  init_key, step_key = jax.random.split(jax.random.key(config.seed))
  mae, mae_params = checkpoints.load_mae(
    mae_checkpoint,
    dtype=model_builder.compute_dtype(config.model.dtype),
    attention=config.model.attention,
  )
  segmenter = Segmenter(mae)
  frozen, trainable = split_frozen(segmenter_params(segmenter, mae_params, init_key))
  sources = inputs.training_sources([config.data, *config.get("extra_data", [])])
  load_size = int(settings.get("load_size") or 0) or mae.img_size
  if load_size < mae.img_size:
    raise ConfigError(
      f"--config.stage2.load_size: {load_size} px images have no {mae.img_size} px tiles; "
      "set 0 (whole images) or at least the model's input size."
    )
  short_side = int(settings.get("load_short_side") or 0)
  images = inputs.load_training_images(
    sources, load_size, mae.img_size, short_side, True, config.data.num_workers
  )
  grey, tile_size = inputs.all_grey(images), inputs.device_tile(images, mae.img_size)
  per_epoch, total, warmup = loop.schedule_lengths(config, len(images))
  spec = _spec(config, segmenter, total, warmup, grayscale=grey, tile_size=tile_size)
  bank = parallel.replicate(jnp.asarray(_texture_bank(settings.synthetic, mae.img_size)), mesh)
  frozen = parallel.replicate(frozen, mesh)
  logger.info(
    "MALA stage 2 from %s on %d %simages: %d steps (%d per epoch), batch %d, lr %.3g",
    mae_checkpoint,
    len(images),
    "grey " if grey else "",
    total,
    per_epoch,
    settings.batch_size,
    settings.lr,
  )
  key_data = np.asarray(jax.random.key_data(step_key))
  manager = training.checkpoint_manager(workdir / loop.CHECKPOINT_DIR, max_to_keep=2)
  fresh = parallel.replicate(training.init_state(trainable, spec.optimizer.make()), mesh)
  state, start_step = loop.resume(fresh, manager, key_data, mesh)
  run_ = loop.TrainingRun(
    config, workdir, mesh, segmenter, mae_checkpoint, images, per_epoch, total, spec, step_key
  )
  compiled = make_step(spec, mesh)
  state, stats = loop.train_loop(
    run_,
    state,
    start_step,
    manager,
    key_data,
    lambda s, b: compiled(s, frozen, bank, b, step_key),
    desc="mala stage 2",
  )
  manager.close()
  params = merge(frozen, state["params"])  # Replicated device arrays.
  save_segmenter(workdir / SEGMENTER_DIR, segmenter, params, f"MALA stage 2: {workdir}")
  return loop.write_summary(
    workdir,
    total,
    start_step,
    len(images),
    stats,
    wall_start,
    segmenter_dir=str(workdir / SEGMENTER_DIR),
  )

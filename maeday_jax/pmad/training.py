"""`train(...)`: PMAD's reconstructor trained on normal images, resumable, then exported.

Each step takes a batch of normal images (random tiles of the input size when the images
are kept larger, random flips), computes the targets with the frozen networks (the
tokenizer's codes, the codebook's codes of the feature network's patches, normalised
features or pixels), masks a fixed number of patches per image with the combinational
strategies (`masking.mixed_masks`: random, blockwise, frequency-weighted, dynamic,
region-limited, one drawn per image) and minimises the loss on the masked patches. The
dynamic strategy reads a running mean of each grid position's loss, kept in the
training state.

Files under `workdir`:
  checkpoints/<step>/   Orbax training state and the run's key (a rerun resumes)
  metrics.jsonl, training.png
  reconstructor/        the trained model (`load_reconstructor` reads it; a later fit of
                        another category reuses it with `pmad.reconstructor=<this folder>`)
  summary.json
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from maeday_jax import imagenet, parallel, training
from maeday_jax.config_errors import ConfigError
from maeday_jax.models import pmad_vit
from maeday_jax.pmad import features as pmad_features
from maeday_jax.pmad import masking, targets
from maeday_jax.pretrain import inputs, loop, optim
from maeday_jax.weight_files import orbax_format
from maeday_jax.weight_files.errors import CheckpointError

logger = logging.getLogger(__name__)

RECONSTRUCTOR_DIR = "reconstructor"
KIND = "pmad_reconstructor"


def parse_strategies(text: str) -> dict[str, float]:
  """'random=0.2,blockwise=0.8' -> {name: weight}, normalised to sum 1.

  Raises:
    ConfigError: an unknown strategy, a negative weight, or all weights 0.
  """
  from maeday_jax.settings.pmad import parse_ratios

  field = "pmad.train.strategies"
  try:
    weights = parse_ratios(text)
  except ValueError as e:
    raise ConfigError(f"--config.{field}: {e}; e.g. 'random=0.5,blockwise=0.5'.") from None
  unknown = sorted(set(weights) - set(masking.STRATEGIES))
  if unknown:
    raise ConfigError(
      f"--config.{field}: unknown strategies {unknown}; use {', '.join(masking.STRATEGIES)}."
    )
  if any(w < 0 or not np.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
    raise ConfigError(f"--config.{field}: {text!r}: weights must be >= 0, not all 0.")
  total = sum(weights.values())
  return {name: weights.get(name, 0.0) / total for name in masking.STRATEGIES}


def num_masked(ratio: float, patches: int) -> int:
  """Patches masked per image at `ratio` (at least 1, at most all but one)."""
  return int(min(max(round(ratio * patches), 1), patches - 1))


def features_of(net, images_u8: np.ndarray, layers, grid: int, size: int, batch: int = 32):
  """(M, N, C) NumPy grid features of uint8 images, in padded batches (one compilation)."""
  import dataclasses

  @jax.jit
  def run(params, chunk_u8):
    x = imagenet.normalize(chunk_u8.astype(jnp.float32))
    net_ = dataclasses.replace(net, params=params)
    return pmad_features.grid_features(net_, x, layers, grid, size)

  rows = []
  for start in range(0, len(images_u8), batch):
    chunk = images_u8[start : start + batch]
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    rows.append(np.asarray(run(net.params, jnp.asarray(chunk)))[: batch - pad])
  return np.concatenate(rows)


def _augment(key, images_u8, tile: int, hflip: bool, vflip: bool):
  """Random tiles (when the images are larger than the model's input) and flips."""
  from maeday_jax.pretrain.augmentation import random_tiles

  k_tile, k_h, k_v = jax.random.split(key, 3)
  if tile:
    images_u8 = random_tiles(k_tile, images_u8, tile)
  batch = images_u8.shape[0]
  if hflip:
    flip = jax.random.bernoulli(k_h, 0.5, (batch, 1, 1, 1))
    images_u8 = jnp.where(flip, images_u8[:, :, ::-1], images_u8)
  if vflip:
    flip = jax.random.bernoulli(k_v, 0.5, (batch, 1, 1, 1))
    images_u8 = jnp.where(flip, images_u8[:, ::-1], images_u8)
  return imagenet.normalize(images_u8.astype(jnp.float32))


class Frozen:
  """The frozen networks a step reads: the feature network (features / codebook targets)
  with the codebook, or the tokenizer (dvae targets). Their arrays are step arguments."""

  def __init__(self, kind, net=None, layers=(), feature_size=0, tokenizer=None, codebook=None):
    self.kind, self.net, self.layers = kind, net, tuple(layers)
    self.feature_size, self.tokenizer = int(feature_size), tokenizer
    self.arrays = {}
    if net is not None and kind in ("features", "codebook"):
      self.arrays["net"] = net.params
    if codebook is not None:
      self.arrays["codebook"] = jnp.asarray(codebook)
    if tokenizer is not None:
      self.arrays["tokenizer"] = tokenizer[1]

  def targets(self, arrays, images, grid: int, patch_size: int):
    """Codes (B, N) or values (B, N, D) of normalised images (B, S, S, 3)."""
    import dataclasses

    kind = self.kind
    if kind in ("features", "codebook"):
      net = dataclasses.replace(self.net, params=arrays["net"])
      feats = pmad_features.grid_features(net, images, self.layers, grid, self.feature_size)
      if kind == "codebook":
        return targets.nearest_codes(feats, arrays["codebook"])
      return targets.regression_values(kind, images, feats, patch_size)
    if kind == "dvae":
      from maeday_jax.models import dvae

      module = self.tokenizer[0]
      codes = dvae.tokens(arrays["tokenizer"], module, targets.dvae_inputs(images, grid))
      return codes.reshape(codes.shape[0], -1)
    return targets.regression_values(kind, images, None, patch_size)


def frozen_networks(section, net, images_u8, grid: int, seed: int) -> tuple[Frozen, int]:
  """(`Frozen`, output width) of `section.target` (a `settings.pmad.pmad_config`): the
  tokenizer (dvae), nothing (pixels), or the feature network `net` with, for `codebook`,
  a k-means codebook of its patch features on the training images `images_u8`."""
  kind, layers = section.target, tuple(section.features.layers)
  size = int(section.features.image_size or 0)
  if kind == "dvae":
    from maeday_jax.models import dvae_import

    expected = {"vocab_size": int(section.tokenizer_vocab)}
    tokenizer = dvae_import.load(section.tokenizer, expected=expected)
    return Frozen(kind, tokenizer=tokenizer), int(tokenizer[0].vocab_size)
  if kind == "pixels":
    patch = int(section.image_size) // grid
    return Frozen(kind), patch * patch * 3
  if kind == "features":
    width = features_of(net, images_u8[:1], layers, grid, size).shape[-1]
    return Frozen(kind, net, layers, size), int(width)
  rows = features_of(net, images_u8, layers, grid, size)
  codebook = targets.fit_codebook(rows.reshape(-1, rows.shape[-1]), section.codebook_size, seed)
  logger.info("PMAD codebook: %d codes of %d-d patch features", len(codebook), rows.shape[-1])
  return Frozen(kind, net, layers, size, codebook=np.asarray(codebook)), int(len(codebook))


def optimizer_for(train_section, total_steps: int, warmup_steps: int):
  """(AdamW with warm-up, cosine decay and optional clipping, its schedule) of a
  `settings.pmad.train_config`."""
  opt = optim.OptimizerConfig.from_train(train_section, train_section.lr, total_steps, warmup_steps)
  schedule = opt.schedule()
  optimizer = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  if opt.grad_clip:
    optimizer = optax.chain(optax.clip_by_global_norm(opt.grad_clip), optimizer)
  return optimizer, schedule


def make_step(model, frozen: Frozen, optimizer, schedule, train, mesh, tile: int):
  """`step(state, arrays, images_u8, key) -> (state, metrics)`, jitted over `mesh` (the
  batch split over devices, the rest replicated; the state donated)."""
  grid, count = model.grid_size, model.num_patches
  masked_count = num_masked(float(train.mask_ratio), count)
  probabilities = parse_strategies(train.strategies)
  decay, kind = float(train.error_decay), frozen.kind
  whole, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)

  def step(state, arrays, images_u8, key):
    key = jax.random.fold_in(key, state["step"])
    k_aug, k_mask = jax.random.split(key)
    images = _augment(k_aug, images_u8, tile, bool(train.hflip), bool(train.vflip))
    wanted = jax.lax.stop_gradient(frozen.targets(arrays, images, grid, model.patch_size))
    masked = masking.mixed_masks(
      k_mask, images, model.patch_size, masked_count, probabilities, state["error_ema"]
    )

    def loss_fn(params):
      outputs = model.apply({"params": params}, images, masked)
      per_patch = targets.patch_losses(kind, outputs, wanted)
      return targets.masked_mean(per_patch, masked), per_patch

    (loss, per_patch), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    error_ema = masking.update_error_ema(state["error_ema"], per_patch, masked, decay)
    new_state = {
      "params": optax.apply_updates(state["params"], updates),
      "opt_state": opt_state,
      "step": state["step"] + 1,
      "error_ema": error_ema,
    }
    metrics = {
      "loss": loss,
      "learning_rate": schedule(state["step"]),
      "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics

  return jax.jit(
    step,
    in_shardings=(whole, whole, data, whole),
    out_shardings=(whole, whole),
    donate_argnums=0,
  )


def train(
  section: ml_collections.ConfigDict,
  seed: int,
  sources_config: list,
  workdir,
  frozen_parts,
) -> dict:
  """Trains (or resumes) the reconstructor of `section` (`settings.pmad.pmad_config`) on
  the normal images of `sources_config` (data configs with `splits`), under `workdir`.

  `frozen_parts(images_u8, grid) -> (Frozen, out_dim)` builds the frozen target networks
  (and the codebook, from the training images' features) once the images are loaded.
  Returns the summary (also written to `summary.json`), with `reconstructor_dir`.
  """
  wall_start = time.perf_counter()
  workdir = pathlib.Path(workdir).expanduser().absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  train_section = section.train
  mesh = parallel.data_mesh()
  parallel.local_batch_size(train_section.batch_size, mesh)
  size = int(section.image_size)
  load_size = int(train_section.get("load_size") or 0) or size
  if load_size < size:
    raise ConfigError(
      f"--config.pmad.train.load_size: {load_size} px images have no {size} px tiles; set 0 "
      "(whole images) or at least pmad.image_size."
    )
  sources = inputs.training_sources(sources_config)
  short_side = int(train_section.get("load_short_side") or 0)
  images = inputs.load_training_images(sources, load_size, size, short_side)
  init_key, step_key = jax.random.split(jax.random.key(seed))
  patch = pmad_vit.VARIANTS[section.variant]["patch_size"]
  grid = size // patch
  # The codebook is fitted on what the targets are computed from: the training tiles at
  # the images' own resolution (`load_size` > `image_size`, or their own aspect ratio:
  # `load_short_side`), not whole resized images (images of one tile are their own).
  tiled = (
    images if isinstance(images, inputs.AspectImages) else inputs.AspectImages(list(images), size)
  )
  frozen, out_dim = frozen_parts(tiled.all_tiles(), grid)
  _keep_codebook(frozen, workdir)
  model = pmad_vit.create(section.variant, size, out_dim)
  config = ml_collections.ConfigDict(
    {
      "train": train_section,
      "seed": seed,
      "log_every": section.log_every,
      "checkpoint_every": section.checkpoint_every,
    }
  )
  per_epoch, total, warmup = loop.schedule_lengths(config, len(images))
  optimizer, schedule = optimizer_for(train_section, total, warmup)
  params = pmad_vit.init_params(model, init_key)
  fresh = training.init_state(params, optimizer)
  fresh["error_ema"] = jnp.ones((model.num_patches,), jnp.float32)
  fresh = parallel.replicate(fresh, mesh)
  key_data = np.asarray(jax.random.key_data(step_key))
  manager = training.checkpoint_manager(
    workdir / loop.CHECKPOINT_DIR, max_to_keep=int(section.keep_checkpoints)
  )
  state, start_step = loop.resume(fresh, manager, key_data, mesh)
  logger.info(
    "PMAD reconstructor (%s, %s targets, %d outputs) on %d images: %d steps, batch %d",
    section.variant,
    frozen.kind,
    out_dim,
    len(images),
    total,
    train_section.batch_size,
  )
  arrays = parallel.replicate(frozen.arrays, mesh)
  tile = inputs.device_tile(images, size)
  step = make_step(model, frozen, optimizer, schedule, train_section, mesh, tile)
  run = loop.TrainingRun(
    config, workdir, mesh, model, "pmad", images, per_epoch, total, None, step_key
  )
  state, stats = loop.train_loop(
    run, state, start_step, manager, key_data, lambda s, b: step(s, arrays, b, step_key), "pmad"
  )
  manager.close()
  record = {
    "kind": KIND,
    "architecture": pmad_vit.architecture(model),
    "target": frozen.kind,
    "features": section.features.to_dict(),
    "trained_on": len(images),
  }
  out = export(workdir / RECONSTRUCTOR_DIR, record, state["params"], frozen.arrays.get("codebook"))
  return loop.write_summary(
    workdir, total, start_step, len(images), stats, wall_start, reconstructor_dir=str(out)
  )


def _keep_codebook(frozen: Frozen, workdir: pathlib.Path) -> None:
  """A resumed run trains towards the codebook it started with (k-means is not bitwise
  reproducible across thread counts): the first run's is kept in `codebook.npy`."""
  if "codebook" not in frozen.arrays:
    return
  path = workdir / "codebook.npy"
  if path.is_file():
    saved = np.load(path)
    if saved.shape != frozen.arrays["codebook"].shape:
      raise ConfigError(
        f"{path} holds a codebook of shape {saved.shape}, this run's is "
        f"{tuple(frozen.arrays['codebook'].shape)}: the settings changed; use a new workdir."
      )
    frozen.arrays["codebook"] = jnp.asarray(saved)
  elif jax.process_index() == 0:
    np.save(path, np.asarray(frozen.arrays["codebook"]))


CODEBOOK_FILE = "codebook.npy"


def export(directory: pathlib.Path, record: dict, params, codebook=None) -> pathlib.Path:
  """Writes the reconstructor (replacing an earlier export of this training), and the
  codebook its codes index (`codebook` targets: scoring by surprise reads it)."""
  directory = pathlib.Path(directory)
  if directory.exists() and orbax_format.is_converted(directory) and jax.process_index() == 0:
    shutil.rmtree(directory)
  parallel.barrier(f"maeday_jax: cleared {directory}")
  source = "maeday_jax.pmad"
  out = orbax_format.save(directory, record, training.to_host(params), source=source)
  if codebook is not None and jax.process_index() == 0:
    np.save(out / CODEBOOK_FILE, np.asarray(codebook, np.float32))
  return out


def load_reconstructor(path, dtype=jnp.float32, attention: str = "auto"):
  """(model, params, record) of a reconstructor folder written by `train`; the record's
  `codebook` is the codebook array for `codebook` targets (None for the others).

  Raises:
    CheckpointError: not a PMAD reconstructor folder (naming it and what to give).
  """
  path = pathlib.Path(path).expanduser()
  if not orbax_format.is_converted(path):
    raise CheckpointError(
      f"{path}: not a PMAD reconstructor folder; give the `reconstructor/` folder of an "
      "earlier PMAD fit (its work directory's reconstructor/)."
    )
  record = orbax_format.load_architecture(path)
  if record.get("kind") != KIND:
    raise CheckpointError(f"{path}: holds another model ({record.get('kind')!r}), not PMAD's.")
  model = pmad_vit.ProposalReconstructor(**record["architecture"], dtype=dtype, attention=attention)
  shapes = jax.eval_shape(lambda: pmad_vit.init_params(model, jax.random.key(0)))
  codebook = path / CODEBOOK_FILE
  record["codebook"] = np.load(codebook) if codebook.is_file() else None
  return model, orbax_format.load_params(path, shapes), record

"""MALA's training (`maeday_jax.mala`): stage 1 (an MAE pre-training `train` section with
MALA's loss), stage 2 (the segmenter on synthetic defects) and the scoring pool. Light:
imports nothing but `ml_collections` and the other settings (see `maeday_jax.settings`).

`runlocal=True` everywhere: the smoke-test sizes (a few steps of the tiny test model).
"""

from __future__ import annotations

import ml_collections

from maeday_jax.settings import pretrain


def stage1_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """Stage 1: MAE pre-training (`settings.pretrain.train_config`) on MALA's loss,
  `pixel_weight * L1 + ssim_weight * (1 - SSIM) + adversarial_weight * CE`."""
  config = pretrain.train_config(runlocal)
  config.loss = "all"  # The segmenter and MAEDAY both read every patch's output.
  config.pixel_loss = "l1"
  config.ssim_weight = 1.0
  config.adversarial_weight = 0.1
  return config


def stage2_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """Stage 2: the segmenter's training (`mala.stage2.train` reads it as `train`): AdamW,
  `l1_weight * L1 + focal_weight * focal` against synthetic defects (`synthetic`:
  anomaly_prob, beta_range, threshold, textures = comma-separated 'images',
  'procedural', 'folder' (with texture_dir, e.g. the DTD images, max_textures),
  foreground (+ threshold) for object categories, flips)."""
  config = ml_collections.ConfigDict()
  config.batch_size = 8 if runlocal else 16
  config.epochs = 50.0
  config.steps = 4 if runlocal else 0  # > 0 overrides epochs.
  config.warmup_epochs = 1.0
  config.warmup_steps = ml_collections.FieldReference(1 if runlocal else None, int)
  config.lr = 2e-4
  config.min_lr = 0.0
  config.weight_decay = 0.01
  config.b1 = 0.9
  config.b2 = 0.999
  config.grad_clip = 1.0
  config.l1_weight = 1.0
  config.focal_weight = 1.0
  config.focal_gamma = 2.0
  # 0: whole images resized to the model's input size; larger: images kept at this size,
  # and each step trains on a random tile of the input size from each (tiled scoring).
  config.load_size = 0
  # Not 0: images kept at their own aspect ratio instead (short side this many px; -1:
  # their own size), each step a random window of the model's size of each: the tiles
  # that scoring with `tiling.resize_short_side` cuts. `load_size` is then not used.
  config.load_short_side = 0
  config.synthetic = ml_collections.ConfigDict(
    dict(
      anomaly_prob=0.5,
      beta_range=(0.0, 0.8),
      threshold=0.5,
      textures="images,procedural",
      texture_dir="",
      max_textures=0,
      foreground=False,
      foreground_threshold=0.1,
      hflip=True,
      vflip=True,
    )
  )
  return config


def stages_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """What MALA's job and its detector share: `stage1`, `stage2`, checkpointing, logging
  and `pool_size` (k of the image score, the max of the k x k average-pooled map)."""
  config = ml_collections.ConfigDict()
  config.stage1 = stage1_config(runlocal)
  config.stage2 = stage2_config(runlocal)
  config.checkpoint_every = 2 if runlocal else 200
  config.keep_checkpoints = 2
  config.log_every = 1 if runlocal else 10
  config.pool_size = 16
  return config

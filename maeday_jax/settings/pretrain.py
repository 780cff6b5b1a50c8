"""MAE pre-training (`maeday_jax.pretrain.loop`): its optimisation recipe, its optional
end-of-training evaluation and the whole config `loop.train` reads. Light: imports
nothing but `ml_collections` and the other settings (see `maeday_jax.settings`).

`runlocal=True` everywhere: the smoke-test sizes (a few steps of the tiny test model).
"""

from __future__ import annotations

import ml_collections

from maeday_jax.settings.data import data_config, training_source
from maeday_jax.settings.model import RANDOM_WEIGHTS, model_config


def train_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """The pre-training recipe (the official MAE's by default), a job's `train` section."""
  config = ml_collections.ConfigDict()
  config.batch_size = 8 if runlocal else 64
  config.epochs = 400.0
  config.steps = 4 if runlocal else 0  # > 0 overrides epochs.
  config.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256 ...
  config.lr = 0.0  # ... unless this absolute peak lr is > 0.
  config.min_lr = 0.0
  config.warmup_epochs = 40.0
  config.warmup_steps = ml_collections.FieldReference(1 if runlocal else None, int)
  config.weight_decay = 0.05
  config.b1 = 0.9
  config.b2 = 0.95
  config.grad_clip = 0.0  # Global-norm clip; 0 = off (official).
  config.mask_ratio = 0.75
  config.loss = "masked"  # 'masked' (official) or 'all' patches.
  config.norm_pix_loss = False  # Per-patch normalised targets (not for scoring).
  # The loss: pixel_weight * pixel_loss ('mse', official, or 'l1') + ssim_weight *
  # (1 - SSIM) + adversarial_weight * the pseudo-label predictor's CE (MALA stage 1;
  # 0 turns a term off; the predictor, Adam at predictor_lr, exists only when > 0).
  config.pixel_loss = "mse"
  config.pixel_weight = 1.0
  config.ssim_weight = 0.0
  config.adversarial_weight = 0.0
  config.predictor_lr = 2e-4
  config.load_size = 0  # Resolution images are kept at; 0 = the model's img_size.
  # Not 0: images kept at their own aspect ratio instead (short side this many px; -1:
  # their own size), each step a random window of the model's size of each: the tiles
  # that scoring with `tiling.resize_short_side` cuts. `load_size` is then not used.
  config.load_short_side = 0
  config.normal_only = True  # Skip images labelled anomalous.
  config.augment = ml_collections.ConfigDict()
  # 'resized': a random resized crop (area fraction and aspect ratio below) resampled to
  # the model's size; 'tile': a random window of the model's size at `load_size`'s
  # resolution, as tiled scoring (`--config.tiling`) cuts them.
  config.augment.crop = "resized"
  config.augment.crop_scale = (0.2, 1.0)  # Random resized crop: area fraction ...
  config.augment.crop_ratio = (3 / 4, 4 / 3)  # ... and aspect ratio range.
  config.augment.hflip = True
  config.augment.vflip = False
  return config


def eval_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """The optional zero-shot evaluation of the exported model at the end of training."""
  config = ml_collections.ConfigDict()
  config.enabled = False
  config.data = data_config()
  config.split = "test"
  config.num_masks = 4 if runlocal else 32
  config.mask_ratio = 0.75
  config.batch_size = 8
  config.image_size = 224  # Metrics resolution; images are resized to the model's.
  return config


def loop_config(runlocal: bool = False) -> ml_collections.ConfigDict:
  """Everything `pretrain.loop.train` reads (the pre-training job, less its `job` name).

  Sections: `model` (a named variant from scratch, 'random', each architecture field
  overriding it when not None; or a checkpoint to continue from), `data` and
  `extra_data` (the training images: every category `data.categories` selects, splits
  `data.splits`, plus any further sources, each a `training_source(...)`, all in one
  model), `train` (`train_config`), checkpointing and logging, `eval` (`eval_config`).
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(RANDOM_WEIGHTS, "test" if runlocal else "small")
  config.data = training_source("train")
  config.extra_data = []
  config.train = train_config(runlocal)
  config.checkpoint_every = 2 if runlocal else 200
  config.keep_checkpoints = 2
  config.log_every = 1 if runlocal else 10
  config.eval = eval_config(runlocal)
  return config

"""MAE pre-training on the normal images of one or several datasets and categories.

One unified model for every selected category (`data.categories='all'`), from scratch
(`model.checkpoint=''`) or continuing from any checkpoint `load_mae` accepts. The result
is exported to `<workdir>/model` (converted Orbax format: `load_mae(<workdir>/model)`,
`--config.model.checkpoint=<workdir>/model`).

Example commands (`maeday_jax.main` dispatches on `config.job`):

  python -m maeday_jax.main --config=configs/pretrain.py --workdir=/tmp/mae_mvtec \
      --config.data.name=mvtec_ad --config.data.path=/data/mvtec_anomaly_detection
  # A quick run on a tiny model (any data):
  python -m maeday_jax.main --config=configs/pretrain.py:runlocal --workdir=/tmp/mae_local \
      --config.data.name=magnetic_tile --config.data.path=../shared/data/mt_sample
  # Continue the official ViT-B MAE on VisA's normal images, 20 epochs:
  python -m maeday_jax.main --config=configs/pretrain.py --workdir=/tmp/mae_visa \
      --config.model.checkpoint=mae_vit_base --config.data.name=visa \
      --config.train.epochs=20 --config.train.warmup_epochs=2

Running the same command again resumes from the newest checkpoint in the workdir.
"""

import ml_collections

from maeday_jax.data import get_data_config
from maeday_jax.models import ARCH_FIELDS


def data_source(splits: str = "train", **fields) -> ml_collections.ConfigDict:
  """A training data source: the data settings plus `splits` (comma-separated)."""
  source = get_data_config()
  source.splits = splits
  for name, value in fields.items():
    setattr(source, name, value)
  return source


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg='runlocal'` shrinks it to a few steps of the test model."""
  runlocal = arg == "runlocal"
  config = ml_collections.ConfigDict()
  config.job = "pretrain"
  config.seed = 0

  # Architecture: a named variant, each field below overriding it when not None.
  config.model = ml_collections.ConfigDict()
  config.model.variant = "test" if runlocal else "small"
  config.model.checkpoint = ""  # '' = from scratch; else a known name or a path.
  config.model.dtype = "float32"  # Compute dtype ('bfloat16' on accelerators).
  for field in ARCH_FIELDS:
    if field != "in_chans":  # RGB images only.
      field_type = float if field == "mlp_ratio" else int
      config.model[field] = ml_collections.FieldReference(None, field_type=field_type)

  # Training images: every category `data.categories` selects, splits `data.splits`,
  # plus any further sources (each a `data_source(...)`), all in one model.
  config.data = data_source("train")
  config.extra_data = []

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 8 if runlocal else 64
  config.train.epochs = 400.0
  config.train.steps = 4 if runlocal else 0  # > 0 overrides epochs.
  config.train.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256 ...
  config.train.lr = 0.0  # ... unless this absolute peak lr is > 0.
  config.train.min_lr = 0.0
  config.train.warmup_epochs = 40.0
  config.train.warmup_steps = ml_collections.FieldReference(1 if runlocal else None, int)
  config.train.weight_decay = 0.05
  config.train.b1 = 0.9
  config.train.b2 = 0.95
  config.train.grad_clip = 0.0  # Global-norm clip; 0 = off (official).
  config.train.mask_ratio = 0.75
  config.train.loss = "masked"  # 'masked' (official) or 'all' patches.
  config.train.norm_pix_loss = False  # Per-patch normalised targets (not for scoring).
  config.train.load_size = 0  # Resolution images are kept at; 0 = the model's img_size.
  config.train.normal_only = True  # Skip images labelled anomalous.
  config.train.augment = ml_collections.ConfigDict()
  config.train.augment.crop_scale = (0.2, 1.0)  # Random resized crop: area fraction ...
  config.train.augment.crop_ratio = (3 / 4, 4 / 3)  # ... and aspect ratio range.
  config.train.augment.hflip = True
  config.train.augment.vflip = False

  config.checkpoint_every = 2 if runlocal else 200
  config.keep_checkpoints = 2
  config.log_every = 1 if runlocal else 10

  # Optional zero-shot evaluation of the exported model at the end of training.
  config.eval = ml_collections.ConfigDict()
  config.eval.enabled = False
  config.eval.data = get_data_config()
  config.eval.split = "test"
  config.eval.num_masks = 4 if runlocal else 32
  config.eval.mask_ratio = 0.75
  config.eval.batch_size = 8
  config.eval.image_size = 224  # Metrics resolution; images are resized to the model's.
  return config

"""MAE pre-training on the normal images of one or several datasets and categories.

One unified model for every selected category (`data.categories='all'`), from scratch
(`model.checkpoint='random'`) or continuing from any checkpoint `load_mae` accepts. The result
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

The fields and their defaults: `maeday_jax.defaults.pretrain_config`.
"""

import ml_collections

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; `arg='runlocal'` shrinks it to a few steps of the test model."""
  return defaults.pretrain_config(arg)

"""PMAD: one proposal-masked reconstruction model for many product lines, and for lines it
never saw.

  # one model per category of MVTec AD (the paper's single-class table)
  python -m maeday_jax.main --config=configs/pmad.py --workdir=runs/pmad_single \
      --config.data.name=mvtec_ad --config.data.path=/data/mvtec_anomaly_detection
  # one model for all categories
  ... --config.protocol.name=multi
  # trained on some categories, tested on others (cross-class)
  ... --config.protocol.name=cross --config.data.categories=bottle,cable,capsule,... \
      --config.protocol.unseen=carpet,grid,leather,tile,wood --config.eval.data.categories=all

By default the reconstructor predicts the DALL-E tokenizer's visual tokens (its public
`encoder.pkl`, downloaded once) and the prototypes are WideResNet-50 features (ImageNet,
torchvision's public weights). Without them, `--config.pmad.target=codebook` learns a
tokenizer here (a k-means codebook of the feature network's patch features) and
`--config.pmad.features.backbone=mae_vit_base` (or a folder of your own MAE with
`--config.pmad.features.checkpoint=...`) changes the feature network.

Fields and defaults: `maeday_jax.defaults.pmad_config`. `configs/pmad.py:runlocal` runs the
whole pipeline with tiny random-weight models on the magnetic-tile sample in
`../shared/data` (beside the checkout) in a few minutes: finite scores, not meaningful ones.
"""

import pathlib

import ml_collections

from maeday_jax import defaults

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = defaults.pmad_config(arg)
  if arg == "runlocal":
    config.data.name = "magnetic_tile"
    config.data.path = str(SHARED_DATA / "mt_sample")
    config.eval.eval_size = 64
  # Test on the same source as training unless told otherwise.
  config.eval.data.name = config.data.get_ref("name")
  config.eval.data.path = config.data.get_ref("path")
  config.eval.data.categories = config.data.get_ref("categories")
  return config

"""APRIL-GAN's released recipe: train the adapters on one dataset, test zero-shot on another.

  # adapters trained on VisA's test set (15 epochs), for MVTec AD (the paper's table)
  python -m maeday_jax.main --config configs/april_gan.py --workdir runs/april_gan_visa \
    --config.april_gan.aux_data.path=/data/VisA_20220922.tar \
    --config.data.path=/data/mvtec_anomaly_detection --config.data.categories=bottle
  python -m maeday_jax.main --config configs/evaluate.py --workdir runs/april_gan_mvtec \
    --config.detector=runs/april_gan_visa/detector \
    --config.data.name=mvtec_ad --config.data.path=/data/mvtec_anomaly_detection
  # the other direction: adapters on MVTec AD's test set (3 epochs, 4-image mosaics with
  # probability 0.2), for VisA
  python -m maeday_jax.main --config configs/april_gan.py:visa ...

CLIP ViT-L/14-336 at 518 px (its public weights, downloaded once; `--config.clip.checkpoint`
takes a local open_clip or Hugging Face copy), adapters on the outputs of blocks 6, 12,
18 and 24, Adam at 1e-3 with betas (0.5, 0.999), batch 64 (`maeday_jax.settings.clip`).
The fitted adapters serve every category of the target dataset; `data` here only names
the dataset the detector is for (fitting on it is refused: it must not see it). Published:
86.1 image / 87.6 pixel AUROC / 44.0 PRO zero-shot on MVTec AD. The device check runs this
recipe where the weights and both datasets are (`MAEDAY_VISA`, `MAEDAY_MVTEC`).
"""

import ml_collections

from maeday_jax import defaults

TARGETS = {"mvtec_ad": ("visa", 15), "visa": ("mvtec_ad", 3)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  target = "visa" if arg == "visa" else "mvtec_ad"
  config = defaults.fit_config(None if arg == "visa" else arg)
  config.detector = "april_gan"
  config.shots = 0
  config.data.name = target
  aux, epochs = TARGETS[target]
  if arg != "runlocal":
    config.april_gan.aux_data.name = aux
    config.april_gan.epochs = epochs
  return config

"""Recipe: MALA trained here on normal magnetic tiles, evaluated on the tile sample.

Training images: the 684 normal tiles of `../shared/data/mt_normal_train` plus the 16
normal `train` images of `../shared/data/mt_sample` (700 images); the `mt_sample` test
split (24 normal, 40 defective tiles) is never seen in training and is scored at the end
(image AUROC, pixel AUROC, AUPRO at 224 px), beside the reconstruction-error MAEDAY
figures of the same stage-1 model.

Stage 1: the `small` MAE (encoder 256 x 6, decoder 128 x 2) at 112 px, patch 16, from
scratch, 60 epochs of 32 (as `configs/pretrain_mt.py`) with MALA's loss on all patches:
L1 + (1 - SSIM) + 0.1 * the pseudo-label predictor's CE. Stage 2: the encoder frozen,
decoder + Token Balance Module trained for 80 epochs of 16 on synthetic defects (Perlin
masks filled with textures cut from other tiles or drawn procedurally; tiles are a
texture, so no foreground restriction). The README gives the training time and figures.

  nice -n 10 python -m maeday_jax.main --config=configs/mala_mt.py --workdir=runs/mala_mt

Paths are relative to the repository root (the shared folder beside the checkout).
`configs/mala_mt.py:runlocal` runs a few steps of the tiny test model on the same data.
"""

import pathlib

from maeday_jax import defaults

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def get_config(arg: str | None = None):
  config = defaults.mala_config(arg)
  runlocal = arg == "runlocal"
  defaults.use_normal_tiles(config, SHARED_DATA)

  stage1 = config.stage1
  if not runlocal:
    config.model.variant = "small"
    config.model.img_size = 112
    config.model.patch_size = 16
    stage1.batch_size = 32
    stage1.epochs = 60.0
    stage1.warmup_epochs = 5.0
    stage1.lr = 5e-4  # As configs/pretrain_mt.py: a short run on 700 images.
    stage1.grad_clip = 1.0
    stage1.load_size = 224
    config.stage2.epochs = 80.0
    config.stage2.batch_size = 16
    config.checkpoint_every = 200
  stage1.augment.crop_scale = (0.5, 1.0)
  stage1.augment.vflip = True
  return config

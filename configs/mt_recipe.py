"""Recipe: a tiled MALA detector fitted on normal magnetic tiles, in one fit command.

    nice -n 10 python -m maeday_jax.main --config=configs/mt_recipe.py --workdir=runs/mt_recipe
    python -m maeday_jax.main --config=configs/evaluate.py --workdir=runs/mt_recipe_eval \
      --config.detector=runs/mt_recipe/detector --config.data.name=magnetic_tile \
      --config.data.path=../shared/data/mt_sample --config.eval_original_max_side=1024

Training images: the 684 normal tiles of `../shared/data/mt_normal_train` (both splits)
plus the 16 normal `train` images of `../shared/data/mt_sample`; the `mt_sample` test split
is never seen. The network is `configs/mala_mt.py`'s (the `small` MAE at 112 px, MALA's two
stages), but it learns from random 112 px tiles of the images with their aspect ratio
kept, short side 224 px (no resampling of the tiles), and scores them the same way: each
image with its short side at 224 px, cut into overlapping 112 px tiles (stride 56), the
tiles' maps stitched back at the image's size (mean over overlaps); the image score is the
largest tile score. Training resumes when the command is rerun;
it writes `<workdir>/detector/`. Figures and what was tried: docs/recipes.md.

Paths are relative to the repository root (the shared folder beside the checkout).
`configs/mt_recipe.py:runlocal` runs a few steps of the tiny test model on the same data.
"""

import pathlib

from maeday_jax import defaults

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def get_config(arg: str | None = None):
  config = defaults.fit_config(arg)
  runlocal = arg == "runlocal"
  config.detector = "mala"
  defaults.use_normal_tiles(config, SHARED_DATA)
  stages = config.mala
  stage1 = stages.stage1
  tile = 32 if runlocal else 112
  if not runlocal:
    config.model.checkpoint = "random"  # Stage 1 trains the MAE from scratch, here.
    config.model.variant = "small"
    config.model.img_size = tile
    config.model.patch_size = 16
    stage1.batch_size = 32
    stage1.epochs = 60.0
    stage1.warmup_epochs = 5.0
    stage1.lr = 5e-4  # As configs/pretrain_mt.py: a short run on 700 images.
    stage1.grad_clip = 1.0
    stages.stage2.epochs = 80.0
    stages.stage2.batch_size = 16
    stages.checkpoint_every = 200
  # Tiles of the images with their aspect ratio kept, short side 224 px, for training
  # (random 112 px windows, no resampling) and for scoring (chosen on the validation
  # split over square 224 px images: docs/recipes.md).
  stage1.load_size = 2 * tile
  stage1.load_short_side = 2 * tile
  stage1.augment.crop = "tile"
  stage1.augment.vflip = True
  stages.stage2.load_short_side = 2 * tile
  config.tiling.mode = "tiles"
  config.tiling.image_size = 2 * tile
  config.tiling.stride = tile // 2
  config.tiling.resize_short_side = 2 * tile
  return config

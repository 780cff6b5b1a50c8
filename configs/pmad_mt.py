"""Recipe: PMAD fitted on normal magnetic tiles, tiled, on networks trained here.

    # the feature network: the tile-trained MAE of configs/mt_recipe.py (16 minutes)
    nice -n 10 python -m maeday_jax.main --config=configs/mt_recipe.py --workdir=runs/mt_recipe
    nice -n 10 python -m maeday_jax.main --config=configs/pmad_mt.py --workdir=runs/pmad_mt

Neither the DALL-E tokenizer nor an ImageNet backbone can be downloaded here, so both of
PMAD's frozen networks are replaced by one trained here on the normal tiles: the `small`
MAE of `configs/mt_recipe.py` (stage 1: 60 epochs on random 112 px tiles of the images,
short side 224 px; `--config.pmad.features.checkpoint` names its exported model). Its encoder's
patch tokens (blocks 3 and 6) are the prototypes' features, and a 256-code k-means
codebook of them is the tokenizer the reconstructor learns to predict (`target=codebook`:
visual tokens learned here). Patches are scored by the surprise of their own code (-log
p) rather than the paper's entropy, with 10 % of the patches masked: the choice made on a
validation split of the training normals with synthetic defects, never on the test split.

Training images: the 684 normal tiles of `../shared/data/mt_normal_train` (both splits)
plus the 16 normal `train` images of `../shared/data/mt_sample`; prototypes and flow from
the same images. The `mt_sample` test split is never seen: the recipe tests on it at the
end. The reconstructor (`small`: 4 + 4 blocks of width 256) trains on random 112 px tiles
of the images with their aspect ratio kept (short side 224 px), and each test image is
scored the same way as overlapping tiles (stride 56), as the MALA recipe. Figures and
timing: docs/recipes.md.

`configs/pmad_mt.py:runlocal` runs the same pipeline with tiny random models in a minute.
"""

import pathlib

from maeday_jax import defaults

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FEATURE_MAE = "runs/mt_recipe/training/stage1/model"  # configs/mt_recipe.py's stage 1.


def get_config(arg: str | None = None):
  config = defaults.pmad_config(arg)
  runlocal = arg == "runlocal"
  defaults.use_normal_tiles(config, SHARED_DATA)
  pmad = config.pmad
  tile = 32 if runlocal else 112
  if not runlocal:
    pmad.variant, pmad.image_size = "small", tile
    pmad.target, pmad.codebook_size = "codebook", 256
    pmad.features.update(backbone="mae_small", checkpoint=FEATURE_MAE, layers=(2, 5))
    pmad.train.update(batch_size=32, epochs=60.0, warmup_epochs=5.0, lr=5e-4)
    # Chosen on the validation split (tools/studies/mt_validation.py; docs/recipes.md):
    # -log p of each masked patch's own code, the 10 % most abnormal patches masked.
    pmad.scoring, pmad.mask_ratio = "surprise", 0.1
    pmad.checkpoint_every = 200
  else:
    pmad.features.update(backbone="mae_test", checkpoint="random", layers=(1,))
    pmad.train.steps = 4
  # Random tiles of the images with their aspect ratio kept (short side 224 px), and
  # scored the same way, as configs/mt_recipe.py.
  pmad.train.load_size = 2 * tile
  pmad.train.load_short_side = 2 * tile
  pmad.train.vflip = True
  config.tiling.update(
    mode="tiles", image_size=2 * tile, stride=tile // 2, resize_short_side=2 * tile
  )
  return config

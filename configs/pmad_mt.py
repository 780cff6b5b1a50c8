"""Recipe: PMAD fitted on normal magnetic tiles, on networks trained here, in one fit command.

    nice -n 10 python -m maeday_jax.main --config=configs/pmad_mt.py --workdir=runs/pmad_mt
    python -m maeday_jax.main --config=configs/evaluate.py --workdir=runs/pmad_mt_eval \
      --config.detector=runs/pmad_mt/detector --config.data.name=magnetic_tile \
      --config.data.path=../shared/data/mt_sample --config.eval_size=224

Neither the DALL-E tokenizer nor an ImageNet backbone can be downloaded here, so both of
PMAD's frozen networks are replaced by one the fit trains first on the same normal tiles
(`pmad.features.checkpoint=pretrain`, into `<workdir>/training/pmad_features/`): the
`small` MAE exactly as stage 1 of `configs/mt_recipe.py` trains it (the same `model` and
pre-training settings: 60 epochs on random 112 px tiles of the images, short side 224 px,
L1 + SSIM + adversarial loss). Its encoder's patch tokens (blocks 3 and 6) are the
prototypes' features, and a 256-code k-means codebook of them is the tokenizer the
reconstructor learns to predict (`target=codebook`: visual tokens learned here). Patches
are scored by the surprise of their own code (-log p) rather than the paper's entropy,
with 10 % of the patches masked; images keep their aspect ratio (short side 224 px) for
training and scoring: the choices made on a validation split of the training normals with
synthetic defects, never on the test split (docs/recipes.md).

Training images: the 684 normal tiles of `../shared/data/mt_normal_train` (both splits)
plus the 16 normal `train` images of `../shared/data/mt_sample`; prototypes and flow from
the same images. The `mt_sample` test split is never seen. The reconstructor (`small`:
4 + 4 blocks of width 256) trains on random 112 px tiles of the images, and each image is
scored as overlapping 112 px tiles (stride 56), stitched at its size. Every stage resumes
when the command is rerun; it writes `<workdir>/detector/`. Figures and timing:
docs/recipes.md.

`configs/pmad_mt.py:runlocal` runs the same pipeline with tiny random models in a minute.
"""

import importlib.util
import pathlib

from maeday_jax import defaults

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


def _mala_recipe(arg):
  """configs/mt_recipe.py's config: its stage 1 is the feature MAE's recipe."""
  path = pathlib.Path(__file__).with_name("mt_recipe.py")
  spec = importlib.util.spec_from_file_location("mt_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None):
  config = defaults.fit_config(arg)
  runlocal = arg == "runlocal"
  config.detector = "pmad"
  defaults.use_normal_tiles(config, SHARED_DATA)
  pmad = config.pmad
  tile = 32 if runlocal else 112
  # The feature MAE: trained first, on the same images, as the MALA recipe's stage 1.
  mala = _mala_recipe(arg)
  config.model = mala.model
  config.pretrain.train = mala.mala.stage1
  for field in ("checkpoint_every", "keep_checkpoints", "log_every"):
    config.pretrain[field] = mala.mala[field]
  backbone = "mae_test" if runlocal else "mae_small"
  pmad.features.update(
    backbone=backbone, checkpoint="pretrain", layers=(1,) if runlocal else (2, 5)
  )
  if not runlocal:
    pmad.variant, pmad.image_size = "small", tile
    pmad.target, pmad.codebook_size = "codebook", 256
    pmad.train.update(batch_size=32, epochs=60.0, warmup_epochs=5.0, lr=5e-4)
    # Chosen on the validation split (tools/studies/mt_validation.py; docs/recipes.md):
    # -log p of each masked patch's own code, the 10 % most abnormal patches masked.
    pmad.scoring, pmad.mask_ratio = "surprise", 0.1
    pmad.checkpoint_every = 200
  else:
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

"""The job configs, composed of the settings sections of `maeday_jax.settings`.

Every setting lives beside the code that owns it, in the light `maeday_jax.settings`
modules (model, data, few_shot, patchcore, pretrain, mala); this module composes them
into whole jobs for the config files (`configs/*.py`) and re-exports them, so that
`defaults.model_config()`, `defaults.RANDOM_WEIGHTS`, ... keep working there. Like the
settings it imports nothing but `ml_collections` (and, in `detector_sections`, the light
detector registry), so a config file builds its dict without loading JAX, Orbax or any
model code. The library never imports this module (tests/test_configs.py checks it):
library modules read `maeday_jax.settings` directly; jobs and config files may use it.

    config.model = defaults.model_config()                 # which MAE, which dtype
    config.data = defaults.data_config()                   # which images
    config = defaults.zero_shot_config(arg)                # a whole scoring job
    config.train = defaults.few_shot_train_config()        # few-shot adaptation
"""

from __future__ import annotations

import ml_collections

from maeday_jax.settings import mala as mala_settings
from maeday_jax.settings import pmad as pmad_settings
from maeday_jax.settings import pretrain as pretrain_settings
from maeday_jax.settings import tiling as tiling_settings
from maeday_jax.settings.data import DEFAULT_DATA_DIR, data_config, training_source
from maeday_jax.settings.few_shot import (
  CROP_SCALE,
  FEW_SHOT_METHODS,
  FILL_MODE,
  FINETUNE_MODES,
  LORA_COMPUTE_MODES,
  LORA_RANK,
  LORA_TARGETS,
  MAX_ROTATION_DEG,
  few_shot_train_config,
)
from maeday_jax.settings.model import (
  ARCH_FIELD_TYPES,
  ATTENTION_IMPLEMENTATIONS,
  DTYPES,
  MASKINGS,
  RANDOM_WEIGHTS,
  model_config,
)
from maeday_jax.settings.patchcore import patchcore_config

__all__ = [
  # Re-exported from `maeday_jax.settings` for the config files, jobs and tests.
  "ARCH_FIELD_TYPES",
  "ATTENTION_IMPLEMENTATIONS",
  "CROP_SCALE",
  "DEFAULT_DATA_DIR",
  "DTYPES",
  "FEW_SHOT_METHODS",
  "FILL_MODE",
  "FINETUNE_MODES",
  "LORA_COMPUTE_MODES",
  "LORA_RANK",
  "LORA_TARGETS",
  "MASKINGS",
  "MAX_ROTATION_DEG",
  "RANDOM_WEIGHTS",
  "data_config",
  "few_shot_train_config",
  "model_config",
  "patchcore_config",
  "training_source",
  # The job configs.
  "detector_sections",
  "evaluate_config",
  "fit_config",
  "mala_config",
  "pretrain_config",
  "zero_shot_config",
]


def _check_arg(arg: str | None) -> bool:
  """Whether `arg` (a config file's argument) asks for the smoke test, 'runlocal'."""
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"Unknown config argument {arg!r}; the only one is 'runlocal'.")
  return arg == "runlocal"


def zero_shot_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The zero-shot scoring job (see `configs/zero_shot.py` for what each part means).

  `arg='runlocal'` shrinks it to a smoke test: the tiny random-weight `test` model,
  4 masks, few pictures.
  """
  _check_arg(arg)
  config = ml_collections.ConfigDict()
  config.job = "zero_shot"
  config.seed = 0  # With each image's pixels, sets its masks: runs are reproducible.

  config.model = model_config()
  config.data = data_config()

  config.num_masks = 32
  config.mask_ratio = 0.75
  config.batch_size = 8  # Global batch (images); a multiple of the device count.
  # 'random' (the paper's i.i.d. masks) or 'stratified' (groups of masks whose visible
  # patches partition the image; see `models.masking.stratified_noise`).
  config.masking = "random"
  # Reconstruct this many masks at a time (0 = chosen from the device's free memory:
  # all masks in one pass when they fit).
  config.mask_batch_size = 0
  config.eval_size = 0  # Pixel-metric resolution (0 = the model's input size, 224).
  # > 0: pixel metrics at each mask's original size instead (e.g. MVTec AD's 700-1024 px),
  # its longer side capped at this; each map is resized to its mask. 0: at eval_size.
  config.eval_original_max_side = 0

  config.threshold = ml_collections.ConfigDict(dict(method="auto", percentile=99.0, value=0.0))
  config.outputs = ml_collections.ConfigDict(
    dict(
      overlays=True,  # A heatmap overlay PNG for every image.
      panels=16,  # Image | ground truth | heatmap | predicted mask, per category (-1: all).
      reconstructions=2,  # Masked inputs and reconstructions for this many images.
      roc=True,  # ROC curve per category (labelled data).
    )
  )

  if arg == "runlocal":
    config.model.checkpoint = RANDOM_WEIGHTS
    config.model.variant = "test"
    config.num_masks = 4
    config.batch_size = 8
    config.outputs.panels = 4
    config.outputs.reconstructions = 1
  return config


def pretrain_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """MAE pre-training (see `configs/pretrain.py`): what `pretrain.loop.train` reads
  (`settings.pretrain.loop_config`) plus the job's name; `arg='runlocal'`: a few steps
  of the tiny test model."""
  config = ml_collections.ConfigDict(dict(job="pretrain"))
  config.update(pretrain_settings.loop_config(_check_arg(arg)))
  return config


def mala_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MALA detector (`configs/mala.py`): stage 1 MAE, stage 2 segmenter, evaluation.

  `arg='runlocal'`: a few steps of the tiny test model (a smoke test).

  Sections:
    model: the MAE stage 1 starts from ('random' + variant: from scratch; or any
      checkpoint, e.g. `<workdir>/model` of `configs/pretrain.py`).
    data, extra_data: the normal training images of every category of every source,
      all in one model (multi-class).
    stage1, stage2, pool_size, checkpointing, logging: `settings.mala.stages_config`.
      `stage1.epochs=0` and `stage1.steps=0` skip stage 1: stage 2 starts from
      `model.checkpoint`.
    eval: the test images (`eval.data`; by default the same source, split `test`),
      batch_size, eval_size (pixel-metric resolution), maeday (also score the stage-1
      MAE's reconstruction error, 32 masks, for comparison), threshold and outputs as in
      zero-shot scoring.
  """
  runlocal = _check_arg(arg)
  config = ml_collections.ConfigDict()
  config.job = "mala"
  config.seed = 0
  config.model = pretrain_settings.loop_config(runlocal).model  # As pre-training's.
  config.data = training_source("train")
  config.extra_data = []
  config.update(mala_settings.stages_config(runlocal))

  config.eval = ml_collections.ConfigDict()
  config.eval.data = data_config()
  config.eval.batch_size = 8
  config.eval.eval_size = 224
  config.eval.eval_original_max_side = 0  # As the zero-shot job's (> 0: masks' own size).
  config.eval.maeday = True
  config.eval.num_masks = 4 if runlocal else 32
  config.eval.mask_ratio = 0.75
  scoring = zero_shot_config(arg)
  config.eval.threshold = scoring.threshold
  config.eval.outputs = scoring.outputs
  return config


def use_normal_tiles(config: ml_collections.ConfigDict, shared_data) -> None:
  """The magnetic-tile recipes' images (`configs/*_mt.py`, `configs/mt_recipe.py`): train
  on the 684 normal tiles of `<shared_data>/mt_normal_train` (both of its splits hold
  normal tiles only) plus the 16 normal `train` images of `<shared_data>/mt_sample`; test
  (`eval.data`, where the config has one) on the `mt_sample` test split, never trained on.
  """
  import pathlib

  shared = pathlib.Path(shared_data)
  config.data = training_source(
    "train,test", name="magnetic_tile", path=str(shared / "mt_normal_train")
  )
  config.extra_data = [
    training_source("train", name="magnetic_tile", path=str(shared / "mt_sample"))
  ]
  if "eval" in config and "data" in config.eval:
    config.eval.data.name = "magnetic_tile"
    config.eval.data.path = str(shared / "mt_sample")


def pmad_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The PMAD recipe (`configs/pmad.py`): fit PMAD under a protocol, then test it.

  `arg='runlocal'`: the tiny models for a few steps (a smoke test).

  Sections:
    data, extra_data: the normal training images (`data.categories`: the seen classes).
    pmad: the detector's settings (`settings.pmad.pmad_config`); tiling: as every
      detector's (`--config.tiling.mode=tiles`: trained and scored on tiles).
    protocol: name 'single' (one detector per category of `data`), 'multi' (one detector
      for every category of `data`, prototypes of all of them) or 'cross' (the
      reconstructor trained once on `data`'s categories, then, for each category of
      `unseen`, prototypes and flow from that category's normal training images only);
      paper_split: the published cross-class row to show beside ours
      (`pmad.published.CROSS_CLASS_MVTEC`).
    eval: the test images (`eval.data`; its categories are the ones each protocol tests),
      batch_size, eval_size, eval_original_max_side, threshold, outputs.
  """
  runlocal = _check_arg(arg)
  config = ml_collections.ConfigDict()
  config.job = "pmad"
  config.seed = 0
  config.data = training_source("train")
  config.extra_data = []
  config.pmad = pmad_settings.pmad_config()
  if runlocal:
    pmad_settings.use_smoke_test_sizes(config.pmad)
  config.tiling = tiling_settings.tiling_config()
  config.protocol = ml_collections.ConfigDict({"name": "single", "unseen": "", "paper_split": ""})
  config.eval = ml_collections.ConfigDict()
  config.eval.data = data_config()
  config.eval.batch_size = 8
  config.eval.eval_size = 224
  config.eval.eval_original_max_side = 0
  scoring = zero_shot_config(arg)
  config.eval.threshold = scoring.threshold
  config.eval.outputs = scoring.outputs
  return config


# ------------------------------------------------------------------ detector jobs


def detector_sections(config: ml_collections.ConfigDict, runlocal: bool = False) -> None:
  """Adds every registered detector's settings sections that `config` lacks (their
  defaults live beside each detector in `maeday_jax.detectors`), plus `detector`.

  `runlocal`: every detector on its tiny random-weight model, trained for a few steps.
  """
  from maeday_jax.detectors import registry  # Light: reads only the sections.

  config.detector = config.get("detector", "maeday")
  for name, value in registry.all_sections().items():
    if name not in config:
      config[name] = value
  if runlocal:
    config.model.checkpoint = RANDOM_WEIGHTS
    config.model.variant = "test"
    config.num_masks = 4
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.lora.rank = 4
    config.patchcore.backbone = RANDOM_WEIGHTS
    config.patchcore.variant = "test_wide"
    config.patchcore.image_size = 32  # The tiny MAE's input size: ensembles need one.
    # 16 patches per 32 px shot: keep half, so the image score's neighbourhood is not a
    # single bank row (whose re-weighting would make every score 0).
    config.patchcore.coreset_ratio = 0.5
    small = pretrain_settings.loop_config(runlocal=True)
    config.pretrain.train = small.train
    config.pretrain.checkpoint_every = small.checkpoint_every
    config.pretrain.log_every = small.log_every
    config.anomalydino.backbone = "dinov2_test"
    config.anomalydino.checkpoint = "random"
    config.anomalydino.image_size = 56
    config.anomalydino.rotations = (0, 90)
    config.musc.backbone = "dinov2_test"
    config.musc.checkpoint = "random"
    config.musc.image_size = 56
    config.musc.layers = (0, 2)
    config.clip.backbone = "clip_test"
    config.clip.checkpoint = "random"
    config.clip.image_size = 32
    config.clip.layers = (0, 1, 2)
    # The smoke test trains APRIL-GAN's adapters for 2 steps on the job's own test images
    # and masks (aux_data.name '': no second dataset at hand), recorded as not zero-shot.
    config.april_gan.aux_data.name = ""
    config.april_gan.allow_same_dataset = True
    config.april_gan.steps = 2
    config.april_gan.batch_size = 4
    pmad_settings.use_smoke_test_sizes(config.pmad)
    mala = mala_settings.stages_config(runlocal=True)
    for field in ("stage1", "stage2", "checkpoint_every", "log_every"):
      config.mala[field] = mala[field]


def fit_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The fit job (`configs/fit.py`): fit one detector, write `<workdir>/detector/`.

  Fields (besides every detector's sections, `detector_sections`):
    detector: a registered method (`maeday_jax.detectors.registry.names()`).
    members: the methods of `detector=ensemble`, comma-separated.
    shots: normal training images to fit on, chosen by `seed`; 0 = all of them.
    heldout_normals: further normal training images (not shots) kept aside for the
      detector's normal statistics (ensembles standardise by them) and the threshold.
    threshold: method 'none' (default), 'percentile' (of the held-out normals' scores)
      or 'fixed' (`value`): stored in the artifact; the bulk job predicts labels with it.
    batch_size: images per scoring step (normal statistics).
  """
  runlocal = _check_arg(arg)
  config = ml_collections.ConfigDict()
  config.job = "fit"
  config.seed = 0
  config.detector = "maeday"
  config.data = data_config()
  config.shots = 0
  config.heldout_normals = 8
  config.batch_size = 8
  config.threshold = ml_collections.ConfigDict(dict(method="none", percentile=99.0, value=0.0))
  detector_sections(config, runlocal)
  return config


def evaluate_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The evaluate job (`configs/evaluate.py`): score a dataset's test images with one
  detector (a fitted artifact, or a zero-shot method by name) and report.

  Fields: those of `zero_shot_config` (data, batch_size, eval_size, threshold,
  outputs), `detector` (a registered zero-shot method or the path of a fitted
  `detector/` folder) and every detector's sections (used when `detector` is a name).
  """
  runlocal = _check_arg(arg)
  config = zero_shot_config(arg)
  config.job = "evaluate"
  detector_sections(config, runlocal)
  return config

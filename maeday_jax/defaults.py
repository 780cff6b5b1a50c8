"""Default settings of every job, as `ml_collections` sections the config files compose.

This module imports nothing but `ml_collections`, so a config file (`configs/*.py`) builds
its dict without loading JAX, Orbax or any model code. The library modules take their
defaults from here (`lora.DEFAULT_RANK`, `augment.DEFAULT_CROP_SCALE`, ...), so every
default has one home.

    config.model = defaults.model_config()                 # which MAE, which dtype
    config.data = defaults.data_config()                   # which images
    config = defaults.zero_shot_config(arg)                # a whole scoring job
    config.train = defaults.few_shot_train_config()        # few-shot adaptation
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

# `model.checkpoint` value that means "randomly initialised weights of `model.variant`"
# (MAE pre-training from scratch, smoke tests).
RANDOM_WEIGHTS = "random"
# Compute dtypes; 'auto' = bfloat16 on GPUs and TPUs, float32 on CPUs (parameters,
# LayerNorm statistics, the softmax and the error maps are float32 in every case).
DTYPES = ("auto", "float32", "bfloat16")
# How attention is computed (`models.resolve_attention`): 'auto' = explicit einsums on
# CPUs, cuDNN's fused kernel on GPUs in half precision, XLA's fusion otherwise.
ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")
# Mask schedules (`models.masking`): i.i.d. random masks (the paper), or groups of masks
# whose visible patches partition the image, so every patch is seen equally often.
MASKINGS = ("random", "stratified")

# The fields that define an MAE architecture (what a converted checkpoint's config
# records), with their types. `models.ARCH_FIELDS` is this tuple's keys.
ARCH_FIELD_TYPES: dict[str, type] = {
  "img_size": int,
  "patch_size": int,
  "in_chans": int,
  "embed_dim": int,
  "depth": int,
  "num_heads": int,
  "decoder_embed_dim": int,
  "decoder_depth": int,
  "decoder_num_heads": int,
  "mlp_ratio": float,
}

DEFAULT_DATA_DIR = "~/.cache/maeday_jax/tfds"

# Few-shot adaptation (spec §1): LoRA of rank 32 on every weight matrix of the MAE: the
# patch-embedding projection, in encoder and decoder blocks alike the attention qkv/out
# projections and the MLP layers, plus the decoder's input and output projections.
# Patterns must match the whole '/'-joined parameter path. Biases, LayerNorms, tokens and
# the (fixed) position tables are not adapted.
LORA_RANK = 32
LORA_TARGETS: tuple[str, ...] = (
  r"patch_embed/proj/kernel",
  r"(decoder_)?blocks_\d+/attn/(qkv|proj)/kernel",
  r"(decoder_)?blocks_\d+/mlp/fc[12]/kernel",
  r"decoder_embed/kernel",
  r"decoder_pred/kernel",
)
# How a LoRA step computes the adapted layers (see `lora.on_activations`): "activations"
# (frozen layer + (x A) B; the frozen kernels get no gradient) or "weights" (the model
# run on W + A B). Same values; the first does less backward work at ViT widths.
LORA_COMPUTE_MODES = ("activations", "weights")
FINETUNE_MODES = ("lora", "full")
# Few-shot detectors (see `jobs/few_shot.py`): MAEDAY, PatchCore, their sum, and two
# PatchCore banks from different coreset keys (the paper's "2 x PC").
FEW_SHOT_METHODS = ("maeday", "patchcore", "ensemble", "patchcore_x2")
# Few-shot augmentation (see `maeday_jax.augment` for why these are mild).
MAX_ROTATION_DEG = 15.0
CROP_SCALE = (0.8, 1.0)
FILL_MODE = "reflect"


def model_config(
  checkpoint: str = "mae_vit_large", variant: str = "test"
) -> ml_collections.ConfigDict:
  """Which MAE a job uses (`model_builder.build_model` reads this section).

  Fields:
    checkpoint: a known name (mae_vit_base, mae_vit_large, mae_vit_huge,
      mae_vit_large_ganloss), a local .pth / .safetensors file, a converted directory, or
      'random' for randomly initialised weights of `variant` (pre-training from scratch,
      smoke tests).
    variant: architecture for checkpoint='random' (base, large, huge, small, test).
    img_size, patch_size, ..., mlp_ratio (`ARCH_FIELD_TYPES`): None keeps the variant's or
      the checkpoint's value. With 'random' they override the variant; with a checkpoint
      `num_heads` / `decoder_num_heads` set the head counts (not in the tensor shapes)
      and the others must agree with the checkpoint.
    dtype: compute dtype: 'auto' (default: bfloat16 on GPUs and TPUs, float32 on CPUs),
      'float32' or 'bfloat16'.
    attention: 'auto' (default), 'einsum', 'xla' or 'cudnn' (`ATTENTION_IMPLEMENTATIONS`);
      every choice computes the same function, at different speeds per backend.
    cache_dir: download/conversion cache ('' = $MAEDAY_CACHE_DIR or ~/.cache/maeday_jax).
  """
  config = ml_collections.ConfigDict()
  config.checkpoint = checkpoint
  config.variant = variant
  for field, field_type in ARCH_FIELD_TYPES.items():
    config[field] = config_dict.placeholder(field_type)
  config.dtype = "auto"
  config.attention = "auto"
  config.cache_dir = ""
  return config


def data_config() -> ml_collections.ConfigDict:
  """Which images a job reads (`config.data` of every job).

  Fields:
    name: `mvtec_ad`, `visa`, `magnetic_tile` or `folder`.
    path: the raw copy: an extracted archive, the downloaded archive or the user's folder
      of images to score. It is the tfds manual directory. Empty for `mvtec_ad` / `visa`
      means download the public archive into `data_dir`.
    categories: 'all', a comma-separated string or a list of category names. `folder`
      and `magnetic_tile` have one pseudo-category (see `data.resolve_categories`).
    data_dir: where the prepared array_record files are cached (default
      `$MAEDAY_DATA_DIR` or ~/.cache/maeday_jax/tfds). They are rebuilt when the builder
      version changes and, for `folder` and `magnetic_tile`, when the files change.
    normal_path: `folder` only: optional folder of normal reference images ('train').
    mask_path: `folder` only: optional folder of masks paired with the images by name.
    num_workers: threads that decode and resize images while the model computes.
    prefetch: batches prepared ahead of the one being consumed.

  Example overrides on the command line:

    --config.data.name=mvtec_ad --config.data.categories=bottle,carpet
    --config.data.name=mvtec_ad --config.data.path=/data/mvtec_anomaly_detection.tar.xz
    --config.data.name=folder --config.data.path=/photos/line3 \\
        --config.data.normal_path=/photos/line3_good --config.data.mask_path=/photos/masks
  """
  config = ml_collections.ConfigDict()
  config.name = "mvtec_ad"
  config.path = ""
  # A string or a list: the field is typed `object` so both can be assigned.
  config.categories = ml_collections.FieldReference("all", field_type=object)
  config.data_dir = os.environ.get("MAEDAY_DATA_DIR", DEFAULT_DATA_DIR)
  config.normal_path = ""
  config.mask_path = ""
  config.num_workers = 4
  config.prefetch = 2
  return config


def zero_shot_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The zero-shot scoring job (see `configs/zero_shot.py` for what each part means).

  `arg='runlocal'` shrinks it to a smoke test: the tiny random-weight `test` model,
  4 masks, few pictures.
  """
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"Unknown config argument {arg!r}; the only one is 'runlocal'.")
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


def few_shot_train_config() -> ml_collections.ConfigDict:
  """Few-shot adaptation settings (spec §1), the `train` section of the few-shot job.

  Fields:
    finetune: 'lora' (default) or 'full' (paper Table 4 ablation).
    steps: optimisation steps (iterations).
    batch_size: copies of the shots per step; a multiple of the number of devices.
    learning_rate: None = 1e-2 for LoRA, 1e-4 for full fine-tuning.
    momentum, weight_decay: SGD with PyTorch semantics (decay added to the gradient).
    mask_ratio: fraction of patches masked in each copy.
    lora.rank, lora.alpha, lora.targets: LoRA rank, alpha (None = rank, i.e. scale 1) and
      regular expressions over '/'-joined parameter paths (see `maeday_jax.lora`).
    lora.compute: 'activations' (default) or 'weights' (`LORA_COMPUTE_MODES`): how a step
      computes the adapted model; the results agree, the speed differs.
    augment.max_rotation_deg, augment.min_crop_scale, augment.max_crop_scale,
      augment.fill_mode: see `maeday_jax.augment`.
    checkpoint_every: save a resumable checkpoint every this many steps when a workdir is
      given (the last step is always saved); 0 = only the last step.
    max_checkpoints: resumable checkpoints kept.
  """
  config = ml_collections.ConfigDict()
  config.finetune = "lora"
  config.steps = 50
  config.batch_size = 32
  config.learning_rate = config_dict.placeholder(float)
  config.momentum = 0.9
  config.weight_decay = 0.05
  config.mask_ratio = 0.75
  config.lora = ml_collections.ConfigDict(
    dict(
      rank=LORA_RANK,
      alpha=config_dict.placeholder(float),
      targets=LORA_TARGETS,
      compute="activations",
    )
  )
  config.augment = ml_collections.ConfigDict(
    dict(
      max_rotation_deg=MAX_ROTATION_DEG,
      min_crop_scale=CROP_SCALE[0],
      max_crop_scale=CROP_SCALE[1],
      fill_mode=FILL_MODE,
    )
  )
  config.checkpoint_every = 10
  config.max_checkpoints = 2
  return config


def training_source(splits: str = "train", **fields) -> ml_collections.ConfigDict:
  """A pre-training data source: the data settings plus `splits` (comma-separated)."""
  source = data_config()
  source.splits = splits
  for name, value in fields.items():
    setattr(source, name, value)
  return source


def pretrain_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """MAE pre-training (see `configs/pretrain.py`); `arg='runlocal'`: a few steps of the
  tiny test model."""
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"Unknown config argument {arg!r}; the only one is 'runlocal'.")
  runlocal = arg == "runlocal"
  config = ml_collections.ConfigDict()
  config.job = "pretrain"
  config.seed = 0

  # A named variant from scratch ('random'), each architecture field overriding it when
  # not None; or a checkpoint to continue from.
  config.model = model_config(RANDOM_WEIGHTS, "test" if runlocal else "small")

  # Training images: every category `data.categories` selects, splits `data.splits`,
  # plus any further sources (each a `training_source(...)`), all in one model.
  config.data = training_source("train")
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
  # The loss: pixel_weight * pixel_loss ('mse', official, or 'l1') + ssim_weight *
  # (1 - SSIM) + adversarial_weight * the pseudo-label predictor's CE (MALA stage 1;
  # 0 turns a term off; the predictor, Adam at predictor_lr, exists only when > 0).
  config.train.pixel_loss = "mse"
  config.train.pixel_weight = 1.0
  config.train.ssim_weight = 0.0
  config.train.adversarial_weight = 0.0
  config.train.predictor_lr = 2e-4
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
  config.eval.data = data_config()
  config.eval.split = "test"
  config.eval.num_masks = 4 if runlocal else 32
  config.eval.mask_ratio = 0.75
  config.eval.batch_size = 8
  config.eval.image_size = 224  # Metrics resolution; images are resized to the model's.
  return config


def patchcore_config() -> ml_collections.ConfigDict:
  """PatchCore settings (spec §1; `maeday_jax.patchcore`), the few-shot job's `patchcore`.

  Fields:
    backbone: a known name (wide_resnet50_2, resnet18, resnet50: torchvision ImageNet
      weights, downloaded and checked), a torchvision `.pth` / timm `.safetensors` file,
      or 'random' (randomly initialised `variant`: smoke tests only).
    variant: the architecture for backbone='random' (`maeday_jax.backbones.VARIANTS`).
    image_size: input size of the backbone (224: layer2 at 28 x 28).
    coreset_ratio: fraction of the shots' patch embeddings kept in the memory bank.
    cache_dir: download cache ('' = $MAEDAY_CACHE_DIR or ~/.cache/maeday_jax).
  """
  return ml_collections.ConfigDict(
    dict(
      backbone="wide_resnet50_2",
      variant="wide_resnet50_2",
      image_size=224,
      coreset_ratio=0.1,
      cache_dir="",
    )
  )


def mala_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MALA detector (`configs/mala.py`): stage 1 MAE, stage 2 segmenter, evaluation.

  `arg='runlocal'`: a few steps of the tiny test model (a smoke test).

  Sections:
    model: the MAE stage 1 starts from ('random' + variant: from scratch; or any
      checkpoint, e.g. `<workdir>/model` of `configs/pretrain.py`).
    data, extra_data: the normal training images of every category of every source,
      all in one model (multi-class).
    stage1: a pre-training `train` section (`pretrain_config`); MALA's loss
      `pixel_weight * L1 + ssim_weight * (1 - SSIM) + adversarial_weight * CE`.
      `epochs=0` and `steps=0` skip stage 1: stage 2 starts from `model.checkpoint`.
    stage2: the segmenter's training: AdamW, `l1_weight * L1 + focal_weight * focal`
      against synthetic defects (`stage2.synthetic`: anomaly_prob, beta_range,
      threshold, textures = comma-separated 'images', 'procedural', 'folder' (with
      texture_dir, e.g. the DTD images, max_textures), foreground (+ threshold) for object
      categories, flips).
    pool_size: k of the image score, the max of the k x k average-pooled map.
    eval: the test images (`eval.data`; by default the same source, split `test`),
      batch_size, eval_size (pixel-metric resolution), maeday (also score the stage-1
      MAE's reconstruction error, 32 masks, for comparison), threshold and outputs as in
      zero-shot scoring.
  """
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"Unknown config argument {arg!r}; the only one is 'runlocal'.")
  runlocal = arg == "runlocal"
  pretrain = pretrain_config(arg)
  config = ml_collections.ConfigDict()
  config.job = "mala"
  config.seed = 0
  config.model = pretrain.model
  config.data = training_source("train")
  config.extra_data = []

  stage1 = pretrain.train
  stage1.loss = "all"  # The segmenter and MAEDAY both read every patch's output.
  stage1.pixel_loss = "l1"
  stage1.ssim_weight = 1.0
  stage1.adversarial_weight = 0.1
  config.stage1 = stage1

  stage2 = ml_collections.ConfigDict()
  stage2.batch_size = 8 if runlocal else 16
  stage2.epochs = 50.0
  stage2.steps = 4 if runlocal else 0  # > 0 overrides epochs.
  stage2.warmup_epochs = 1.0
  stage2.warmup_steps = ml_collections.FieldReference(1 if runlocal else None, int)
  stage2.lr = 2e-4
  stage2.min_lr = 0.0
  stage2.weight_decay = 0.01
  stage2.b1 = 0.9
  stage2.b2 = 0.999
  stage2.grad_clip = 1.0
  stage2.l1_weight = 1.0
  stage2.focal_weight = 1.0
  stage2.focal_gamma = 2.0
  stage2.synthetic = ml_collections.ConfigDict(
    dict(
      anomaly_prob=0.5,
      beta_range=(0.0, 0.8),
      threshold=0.5,
      textures="images,procedural",
      texture_dir="",
      max_textures=0,
      foreground=False,
      foreground_threshold=0.1,
      hflip=True,
      vflip=True,
    )
  )
  config.stage2 = stage2

  config.checkpoint_every = 2 if runlocal else 200
  config.keep_checkpoints = 2
  config.log_every = 1 if runlocal else 10
  config.pool_size = 16

  config.eval = ml_collections.ConfigDict()
  config.eval.data = data_config()
  config.eval.batch_size = 8
  config.eval.eval_size = 224
  config.eval.maeday = True
  config.eval.num_masks = 4 if runlocal else 32
  config.eval.mask_ratio = 0.75
  scoring = zero_shot_config(arg)
  config.eval.threshold = scoring.threshold
  config.eval.outputs = scoring.outputs
  return config

"""Few-shot adaptation (`maeday_jax.few_shot`, `lora`, `augment`): the `train` section of
the few-shot job and the values its fields may take. Light: imports nothing but
`ml_collections` (see `maeday_jax.settings`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# Spec §1: LoRA of rank 32 on every weight matrix of the MAE: the patch-embedding
# projection, in encoder and decoder blocks alike the attention qkv/out projections and
# the MLP layers, plus the decoder's input and output projections. Patterns must match
# the whole '/'-joined parameter path. Biases, LayerNorms, tokens and the (fixed)
# position tables are not adapted.
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
# Few-shot detectors (see `jobs/few_shot.py`): MAEDAY, PatchCore, their sum, two
# PatchCore banks from different coreset keys (the paper's "2 x PC"), AnomalyDINO and
# its sum with MAEDAY.
FEW_SHOT_METHODS = (
  "maeday",
  "patchcore",
  "ensemble",
  "patchcore_x2",
  "anomalydino",
  "maeday_anomalydino",
)
# Few-shot augmentation (see `maeday_jax.augment` for why these are mild).
MAX_ROTATION_DEG = 15.0
CROP_SCALE = (0.8, 1.0)
FILL_MODE = "reflect"


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

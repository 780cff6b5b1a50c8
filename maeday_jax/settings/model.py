"""Which MAE a job runs (`model_builder`, `models`): the `model` section and the values its
fields may take. Light: imports nothing but `ml_collections` (see `maeday_jax.settings`).
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# `model.checkpoint` value that means "randomly initialised weights of `model.variant`"
# (MAE pre-training from scratch, smoke tests).
RANDOM_WEIGHTS = "random"
# Compute dtypes; 'auto' = bfloat16 on GPUs, TPUs and CPUs with bfloat16 instructions,
# float32 on other CPUs (`model_builder.compute_dtype`; parameters, LayerNorm statistics,
# the softmax and the error maps are float32 in every case).
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
    dtype: compute dtype: 'auto' (default: bfloat16 on GPUs, TPUs and CPUs with bfloat16
      instructions, float32 on other CPUs), 'float32' or 'bfloat16'.
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

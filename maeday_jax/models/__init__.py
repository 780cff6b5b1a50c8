"""Flax ViT-MAE modules, masking and patch helpers."""

from maeday_jax.models import masking, patches, pos_embed
from maeday_jax.models.vit_mae import (
  ARCH_FIELDS,
  ATTENTION_IMPLEMENTATIONS,
  VARIANTS,
  MaskedAutoencoder,
  architecture,
  create,
  init_params,
  num_params,
  param_shapes,
  resolve_attention,
)

__all__ = [
  "ARCH_FIELDS",
  "ATTENTION_IMPLEMENTATIONS",
  "VARIANTS",
  "MaskedAutoencoder",
  "architecture",
  "create",
  "init_params",
  "masking",
  "num_params",
  "param_shapes",
  "resolve_attention",
  "patches",
  "pos_embed",
]

"""Flax ViT-MAE modules, masking and patch helpers."""

from maeday_jax.models import masking, patches, pos_embed
from maeday_jax.models.vit_mae import (
  VARIANTS,
  MaskedAutoencoder,
  create,
  init_params,
  num_params,
  param_shapes,
)

__all__ = [
  "VARIANTS",
  "MaskedAutoencoder",
  "create",
  "init_params",
  "masking",
  "num_params",
  "param_shapes",
  "patches",
  "pos_embed",
]

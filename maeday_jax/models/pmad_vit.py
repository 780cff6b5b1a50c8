"""PMAD's patch-level reconstruction model: a ViT encoder and a ViT decoder of the same
structure, with masked patches replaced by a learned [M] token (BEiT-style, not dropped
as in the MAE), predicting a target for every patch.

    model = pmad_vit.create("small", out_dim=8192)      # visual-token logits
    outputs = model.apply({"params": params}, images, masked)   # (B, N, out_dim)

`images` are NHWC float32 (ImageNet-normalised), `masked` (B, N) bool marks the patches the
model must not see (row-major over the patch grid). The output head predicts, per patch,
logits over a tokenizer's codes, a feature vector or the patch's pixels; the loss (and
the anomaly score) reads only the masked patches. Parameters are float32; `dtype` sets
the compute precision (LayerNorm statistics and the outputs stay float32).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maeday_jax.models import pos_embed
from maeday_jax.models.vit_layers import Block, LayerNorm, dense
from maeday_jax.models.vit_mae import PatchEmbed

Dtype = Any
_token_init = nn.initializers.truncated_normal(stddev=0.02)


class ProposalReconstructor(nn.Module):
  """Encoder on every patch ([M] where masked) -> decoder of the same shape -> head.

  Attributes:
    img_size, patch_size: the square input and its patch side.
    embed_dim, depth, num_heads, mlp_ratio: the encoder's (and the decoder's) shape.
    out_dim: outputs per patch (the tokenizer's vocabulary, a feature width, or p*p*3).
    dtype: compute dtype.
    attention: 'auto', 'einsum', 'xla' or 'cudnn' (`vit_layers.resolve_attention`).
  """

  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  out_dim: int = 8192
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @nn.compact
  def __call__(self, images: jax.Array, masked: jax.Array) -> jax.Array:
    if self.img_size % self.patch_size:
      raise ValueError(
        f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}."
      )
    if images.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"images of {images.shape[1:3]} px; this model takes {self.img_size}.")
    tokens = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(images)
    mask_token = self.param("mask_token", _token_init, (1, 1, self.embed_dim))
    tokens = jnp.where(masked[..., None], mask_token.astype(tokens.dtype), tokens)
    # Fixed sin-cos positions (as the MAE): no table to learn or to resize.
    table = pos_embed.sincos_2d(self.embed_dim, self.grid_size, with_cls_token=False)
    positions = jnp.asarray(table)
    x = tokens.astype(jnp.float32) + positions[None]
    block = functools.partial(Block, self.num_heads, self.mlp_ratio, self.dtype, self.attention)
    for i in range(self.depth):
      x = block(name=f"blocks_{i}")(x)
    x = LayerNorm(name="norm")(x)
    x = dense(self.embed_dim, self.dtype, name="decoder_embed")(x)
    x = x.astype(jnp.float32) + positions[None]
    for i in range(self.depth):
      x = block(name=f"decoder_blocks_{i}")(x)
    x = LayerNorm(name="decoder_norm")(x)
    out = dense(self.out_dim, self.dtype, name="head")(x)
    return out.astype(jnp.float32)


# Standard symmetric shapes (encoder = decoder) and small ones for CPUs and tests.
VARIANTS: dict[str, dict[str, int]] = {
  "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
  "small": dict(patch_size=16, embed_dim=256, depth=4, num_heads=4),
  "test": dict(patch_size=8, embed_dim=32, depth=1, num_heads=2),
}
ARCH_FIELDS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "out_dim")


def create(variant: str, img_size: int, out_dim: int, **overrides) -> ProposalReconstructor:
  """A reconstructor of a named shape, e.g. `create("base", 224, 8192)`.

  Raises:
    ValueError: an unknown variant, or a size the patch does not divide.
  """
  if variant not in VARIANTS:
    raise ValueError(f"Unknown PMAD variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  fields = {**VARIANTS[variant], **overrides}
  if img_size % fields["patch_size"]:
    raise ValueError(
      f"image size {img_size} is not a multiple of the {fields['patch_size']}-px patches."
    )
  return ProposalReconstructor(img_size=img_size, out_dim=out_dim, **fields)


def architecture(model: ProposalReconstructor) -> dict:
  """The fields that rebuild `model` (saved in artifacts)."""
  return {field: getattr(model, field) for field in ARCH_FIELDS}


def init_params(model: ProposalReconstructor, key: jax.Array) -> dict:
  """Random initial parameters (one compiled program)."""
  images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  masked = jnp.zeros((1, model.num_patches), bool)
  return jax.jit(lambda k: model.init(k, images, masked)["params"])(key)

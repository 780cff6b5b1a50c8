"""The official ViT Masked Autoencoder, in Flax linen.

Module and parameter names mirror the official PyTorch keys (`blocks_3/attn/qkv/kernel`
for `blocks.3.attn.qkv.weight`), so importing a checkpoint is a rename table plus
transposes (see `maeday_jax.checkpoints`).

Parameters are always float32; `dtype` only sets the compute precision (bfloat16 on
accelerators). LayerNorm statistics, the softmax and the outputs stay float32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.models import masking, patches, pos_embed
from maeday_jax.models.vit_layers import (  # noqa: F401  (re-exported: the MAE's layers)
  ATTENTION_IMPLEMENTATIONS,
  Attention,
  Block,
  LayerNorm,
  Mlp,
  dense,
  resolve_attention,
)
from maeday_jax.settings import model as model_settings

Dtype = Any

# Official initialiser of the tokens, N(0, 0.02) (the Linear layers': `vit_layers.dense`).
_token_init = nn.initializers.normal(stddev=0.02)


class PatchEmbed(nn.Module):
  """Non-overlapping p x p patches -> tokens, through one strided convolution."""

  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    # The official code initialises the conv like a Linear layer (xavier on the flat view).
    x = nn.Conv(
      self.embed_dim,
      (p, p),
      strides=(p, p),
      padding="VALID",
      dtype=self.dtype,
      kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=-1),
      name="proj",
    )(images)
    batch, h, w, width = x.shape
    return x.reshape(batch, h * w, width)


def _fixed_pos_embed(width: int, grid: int):
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(pos_embed.sincos_2d(width, grid)[None], dtype).reshape(shape)

  return init


class MaskedAutoencoder(nn.Module):
  """ViT-MAE: encoder on the visible patches + cls token, light decoder on all patches.

  `model.apply({"params": params}, images, noise=noise)` returns the decoder output
  (B, L, p*p*3) for every patch, masked and visible alike, equal to the official
  `forward_decoder`. Give either `noise` (B, L) or `key`; with neither, the `masking`
  RNG stream is used.

  Attributes:
    img_size: input height and width in pixels.
    patch_size: patch side p.
    embed_dim, depth, num_heads: encoder width, number of blocks, attention heads.
    decoder_embed_dim, decoder_depth, decoder_num_heads: the same for the decoder.
    mlp_ratio: MLP hidden width / model width.
    in_chans: input channels (3).
    mask_ratio: default fraction of patches removed.
    dtype: compute dtype (parameters stay float32).
    attention: how attention is computed, 'auto' (per backend), 'einsum', 'xla' or
      'cudnn' (see `resolve_attention`); every choice computes the same function.
  """

  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  decoder_embed_dim: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  mlp_ratio: float = 4.0
  in_chans: int = 3
  mask_ratio: float = 0.75
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  @property
  def patch_dim(self) -> int:
    return self.patch_size**2 * self.in_chans

  def setup(self):
    if self.img_size % self.patch_size:
      raise ValueError(
        f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}."
      )
    grid, length = self.grid_size, self.num_patches + 1
    self.patch_embed = PatchEmbed(self.patch_size, self.embed_dim, self.dtype)
    self.cls_token = self.param("cls_token", _token_init, (1, 1, self.embed_dim))
    self.pos_embed = self.param(
      "pos_embed", _fixed_pos_embed(self.embed_dim, grid), (1, length, self.embed_dim)
    )
    self.blocks = [
      Block(self.num_heads, self.mlp_ratio, self.dtype, self.attention, name=f"blocks_{i}")
      for i in range(self.depth)
    ]
    self.norm = LayerNorm()
    self.decoder_embed = dense(self.decoder_embed_dim, self.dtype)
    self.mask_token = self.param("mask_token", _token_init, (1, 1, self.decoder_embed_dim))
    self.decoder_pos_embed = self.param(
      "decoder_pos_embed",
      _fixed_pos_embed(self.decoder_embed_dim, grid),
      (1, length, self.decoder_embed_dim),
    )
    self.decoder_blocks = [
      Block(
        self.decoder_num_heads,
        self.mlp_ratio,
        self.dtype,
        self.attention,
        name=f"decoder_blocks_{i}",
      )
      for i in range(self.decoder_depth)
    ]
    self.decoder_norm = LayerNorm()
    self.decoder_pred = dense(self.patch_dim, self.dtype)

  def encode(self, images: jax.Array, ids_keep: jax.Array) -> jax.Array:
    """Encodes the visible patches: (B, H, W, C), (B, K) -> (B, 1 + K, D)."""
    return self.encode_tokens(images, ids_keep)[1]

  def block_tokens(self, images: jax.Array, last: int) -> list[jax.Array]:
    """The encoder's block outputs 0 .. `last` with every patch visible (no masking),
    (B, 1 + L, D) each, class token first: the MAE as a feature network."""
    pos = jax.lax.stop_gradient(self.pos_embed).astype(self.dtype)
    x = self.patch_embed(images.astype(self.dtype)) + pos[:, 1:]
    cls = jnp.broadcast_to(
      self.cls_token.astype(self.dtype) + pos[:, :1], (x.shape[0], 1, x.shape[-1])
    )
    x = jnp.concatenate([cls, x], axis=1)
    outputs = []
    for block in self.blocks[: last + 1]:
      x = block(x)
      outputs.append(x)
    return outputs

  def encode_tokens(self, images: jax.Array, ids_keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(first block's output, normalised last block's output), each (B, 1 + K, D).

    The first layer's tokens keep the local detail the last layer abstracts away (the
    token balance of `maeday_jax.mala` uses both).
    """
    # Position tables are fixed in MAE: never let an optimiser move them.
    pos = jax.lax.stop_gradient(self.pos_embed).astype(self.dtype)
    x = self.patch_embed(images.astype(self.dtype)) + pos[:, 1:]
    x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    cls = jnp.broadcast_to(
      self.cls_token.astype(self.dtype) + pos[:, :1], (x.shape[0], 1, x.shape[-1])
    )
    x = jnp.concatenate([cls, x], axis=1)
    first = None
    for block in self.blocks:
      x = block(x)
      first = x if first is None else first
    return first, self.norm(x).astype(self.dtype)

  def decode(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """Predicts every patch from the latent tokens: (B, 1 + K, D) -> (B, L, p*p*C)."""
    x = self.decoder_pred(self.decode_tokens(latent, ids_restore))
    return x[:, 1:].astype(jnp.float32)

  def decode_tokens(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
    """The decoder's normalised last-layer tokens, cls first: (B, 1 + L, decoder width)."""
    x = self.decoder_embed(latent)
    batch, visible, width = x.shape
    num_masked = ids_restore.shape[1] + 1 - visible
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype), (batch, num_masked, width))
    shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    unshuffled = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], unshuffled], axis=1)
    x = x + jax.lax.stop_gradient(self.decoder_pos_embed).astype(self.dtype)
    for block in self.decoder_blocks:
      x = block(x)
    return self.decoder_norm(x).astype(self.dtype)

  def __call__(
    self,
    images: jax.Array,
    noise: jax.Array | None = None,
    key: jax.Array | None = None,
    mask_ratio: float | None = None,
  ) -> jax.Array:
    """Reconstructs (B, H, W, C) normalised images; returns (B, L, p*p*C) predictions."""
    ratio = self.mask_ratio if mask_ratio is None else mask_ratio
    if noise is None:
      if key is None:
        key = self.make_rng("masking")
      noise = masking.random_noise(key, images.shape[:1], self.num_patches)
    if noise.shape != (images.shape[0], self.num_patches):
      raise ValueError(
        f"noise must have shape (batch, num_patches) = ({images.shape[0]}, "
        f"{self.num_patches}), got {noise.shape}."
      )
    m = masking.from_noise(noise, ratio)
    return self.decode(self.encode(images, m.ids_keep), m.ids_restore)

  # Conveniences shared by scoring and training code.
  def patchify(self, images: jax.Array) -> jax.Array:
    return patches.patchify(images, self.patch_size)

  def unpatchify(self, pred: jax.Array) -> jax.Array:
    return patches.unpatchify(pred, self.patch_size, self.in_chans)


# Official architectures (spec: base 16/768/12/12, large 16/1024/24/16, huge 14/1280/32/16;
# every decoder 512/8/16), and small ones for tests and CPU experiments.
VARIANTS: dict[str, dict[str, int]] = {
  "base": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
  "large": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
  "huge": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
  # ~6M parameters at 224 px: fast enough to train and score on a laptop CPU.
  "small": dict(
    patch_size=16,
    embed_dim=256,
    depth=6,
    num_heads=4,
    decoder_embed_dim=128,
    decoder_depth=2,
    decoder_num_heads=4,
  ),
  # Tiny models for unit tests: compile and run in about a second on a CPU.
  "test": dict(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
  ),
}


# The fields that define an architecture (what a converted checkpoint's config records).
ARCH_FIELDS = tuple(model_settings.ARCH_FIELD_TYPES)


def architecture(model: MaskedAutoencoder) -> dict:
  """The model's architecture fields, e.g. to save next to its parameters."""
  return {field: getattr(model, field) for field in ARCH_FIELDS}


def create(variant: str = "large", **overrides) -> MaskedAutoencoder:
  """Builds a model of a named variant, e.g. `create("base", dtype=jnp.bfloat16)`."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown MAE variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  return MaskedAutoencoder(**{**VARIANTS[variant], **overrides})


def init_params(model: MaskedAutoencoder, key: jax.Array) -> dict:
  """Random (official-style) initial parameters for `model`."""
  images = jnp.zeros((1, model.img_size, model.img_size, model.in_chans), jnp.float32)
  noise = jnp.zeros((1, model.num_patches), jnp.float32)
  # One compiled program, not one per operation (hundreds of small compilations).
  return jax.jit(lambda k: model.init(k, images, noise=noise)["params"])(key)


def param_shapes(model: MaskedAutoencoder) -> dict:
  """The parameter tree of `model` as `jax.ShapeDtypeStruct`s, without allocating."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def num_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

"""CLIP (OpenAI's, as open_clip and Hugging Face run it), in Flax linen.

Two towers and a temperature, in the layout of open_clip's `CLIP` (the OpenAI layout):

  visual        the image tower: `conv1` (patches, no bias), `class_embedding`,
                `positional_embedding`, `ln_pre`, pre-norm blocks, `ln_post` on the class
                token, then `proj` (width -> embed_dim)
  text tower    `token_embedding` + `positional_embedding`, causal pre-norm blocks
                (`text_blocks_{i}`), `ln_final`, the token at the end-of-text position
                (the argmax of the ids: the end token has the largest id), `text_projection`
  logit_scale   log of the softmax temperature's inverse (`exp(logit_scale)` scales cosines)

The blocks are `vit_layers.Block` with CLIP's LayerNorm eps 1e-5, quick-GELU for the
OpenAI weights (GELU for models trained with it, per the checkpoint's config) and a causal
mask in the text tower. `maeday_jax.models.clip_import` renames open_clip / Hugging Face
weights into this tree; `maeday_jax.models.clip_tokenizer` turns prompts into ids.

Other input sizes (any multiple of the patch size, not only square) get the position
table resized as open_clip's `resize_pos_embed` does when it loads a checkpoint into a
model of another image size: bicubic with antialias (PyTorch's `_upsample_bicubic2d_aa`,
PIL's filter), to the output grid, the class position unchanged.

    net = create("vit_b16")
    params = init_params(net, jax.random.key(0))
    image = net.apply({"params": params}, images, method="encode_image")   # (B, 512)
    text = net.apply({"params": params}, ids, method="encode_text")        # (B, 512)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.models.dinov2 import resize_positions
from maeday_jax.models.vit_layers import ACTIVATIONS, Block, LayerNorm

Dtype = Any

# The pixel statistics CLIP was trained with (images are normalised with them, not with
# ImageNet's).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
EPS = 1e-5  # CLIP's LayerNorm epsilon (PyTorch's default; HF's layer_norm_eps).
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408

# OpenAI's models (open_clip `ViT-B-16`, `ViT-L-14`, `ViT-L-14-336` with
# `pretrained="openai"`, Hugging Face `openai/clip-vit-*`): 64-wide heads, quick-GELU.
_TEXT_512 = dict(text_width=512, text_layers=12, text_heads=8)
_TEXT_768 = dict(text_width=768, text_layers=12, text_heads=12)
_L14 = dict(patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16, embed_dim=768)
VARIANTS: dict[str, dict[str, Any]] = {
  "vit_b16": dict(
    image_size=224,
    patch_size=16,
    vision_width=768,
    vision_layers=12,
    vision_heads=12,
    embed_dim=512,
    **_TEXT_512,
  ),
  "vit_l14": dict(image_size=224, **_L14, **_TEXT_768),
  "vit_l14_336": dict(image_size=336, **_L14, **_TEXT_768),
  # The tests' tiny model (tests/fixtures/clip_ref_*): 3 image blocks, 2 text blocks and a
  # 512-token vocabulary (the fixtures stay small; real prompts need the full 49408).
  "test": dict(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=3,
    vision_heads=2,
    embed_dim=24,
    text_width=32,
    text_layers=2,
    text_heads=2,
    vocab_size=512,
  ),
}
ARCH_FIELDS = (
  "image_size",
  "patch_size",
  "vision_width",
  "vision_layers",
  "vision_heads",
  "embed_dim",
  "context_length",
  "vocab_size",
  "text_width",
  "text_layers",
  "text_heads",
  "mlp_ratio",
  "activation",
)


def normalize(pixels) -> jax.Array:
  """uint8 (or 0..255 float) NHWC RGB pixels -> CLIP's normalised float32 input."""
  x = jnp.asarray(pixels, jnp.float32) / 255.0
  return (x - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def _blocks(count, heads, mlp_ratio, dtype, attention, activation, causal=False):
  return [
    Block(
      heads,
      mlp_ratio,
      dtype,
      attention,
      norm_eps=EPS,
      activation=activation,
      causal=causal,
    )
    for _ in range(count)
  ]


class VisionTransformer(nn.Module):
  """CLIP's image tower (open_clip `VisionTransformer`, pooled by the class token)."""

  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  mlp_ratio: float = 4.0
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  def setup(self):
    patch, width = self.patch_size, self.width
    grid = self.image_size // patch
    self.conv1 = nn.Conv(
      width,
      (patch, patch),
      strides=(patch, patch),
      padding="VALID",
      use_bias=False,
      dtype=self.dtype,
    )
    init = nn.initializers.normal(stddev=width**-0.5)
    self.class_embedding = self.param("class_embedding", init, (width,), jnp.float32)
    self.positional_embedding = self.param(
      "positional_embedding", init, (1 + grid * grid, width), jnp.float32
    )
    self.ln_pre = LayerNorm(epsilon=EPS)
    self.blocks = _blocks(
      self.layers, self.heads, self.mlp_ratio, self.dtype, self.attention, self.activation
    )
    self.ln_post = LayerNorm(epsilon=EPS)
    self.proj = self.param("proj", init, (width, self.output_dim), jnp.float32)

  def __call__(self, images: jax.Array, *, last: int | None = None) -> list[jax.Array]:
    """The outputs of blocks 0 .. `last` (default all): (B, 1 + h * w, width) float32 each,
    the class token first, then the patches row by row."""
    batch, height, width, _ = images.shape
    patch = self.patch_size
    if height % patch or width % patch:
      raise ValueError(f"images of {height}x{width} px: both sides must be multiples of {patch}.")
    x = self.conv1(images.astype(self.dtype))
    rows, cols = x.shape[1], x.shape[2]
    x = x.reshape(batch, rows * cols, self.width).astype(jnp.float32)
    cls = jnp.broadcast_to(self.class_embedding, (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    # open_clip resizes a checkpoint's table to the model's grid: output size, antialias.
    x = x + resize_positions(self.positional_embedding[None], rows, cols, 0.0, True)
    x = self.ln_pre(x)
    outputs = []
    for block in self.blocks[: (self.layers if last is None else last + 1)]:
      x = block(x)
      outputs.append(x)
    return outputs

  def pool(self, tokens: jax.Array) -> jax.Array:
    """The image embedding of the last block's tokens: ln_post(class token) @ proj."""
    return jnp.matmul(self.ln_post(tokens[:, 0]), self.proj, precision=jax.lax.Precision.HIGHEST)

  def norm(self, tokens: jax.Array) -> jax.Array:
    """`ln_post` on every token (as open_clip applies it before pooling)."""
    return self.ln_post(tokens)

  def project(self, tokens: jax.Array) -> jax.Array:
    """ln_post(tokens) @ proj: tokens in the joint image-text space (WinCLIP-style maps)."""
    return jnp.matmul(self.ln_post(tokens), self.proj, precision=jax.lax.Precision.HIGHEST)


class CLIP(nn.Module):
  """CLIP: `encode_image`, `encode_text` (projected, not L2-normalised), `logit_scale`.

  Attributes:
    image_size, patch_size, vision_width, vision_layers, vision_heads: the image tower.
    embed_dim: the joint embedding width.
    context_length, vocab_size, text_width, text_layers, text_heads: the text tower.
    mlp_ratio: the MLPs' hidden width / width (4 in every CLIP).
    activation: 'quick_gelu' (OpenAI's weights) or 'gelu'.
    dtype: compute dtype (parameters, LayerNorms and the residual stream stay float32).
    attention: as for the other ViTs (`vit_layers.resolve_attention`).
  """

  image_size: int = 224
  patch_size: int = 16
  vision_width: int = 768
  vision_layers: int = 12
  vision_heads: int = 12
  embed_dim: int = 512
  context_length: int = CONTEXT_LENGTH
  vocab_size: int = VOCAB_SIZE
  text_width: int = 512
  text_layers: int = 12
  text_heads: int = 8
  mlp_ratio: float = 4.0
  activation: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  def setup(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r} is not one of {ACTIVATIONS}.")
    self.visual = VisionTransformer(
      self.image_size,
      self.patch_size,
      self.vision_width,
      self.vision_layers,
      self.vision_heads,
      self.embed_dim,
      self.mlp_ratio,
      self.activation,
      self.dtype,
      self.attention,
    )
    width = self.text_width
    self.token_embedding = nn.Embed(
      self.vocab_size, width, embedding_init=nn.initializers.normal(0.02)
    )
    self.positional_embedding = self.param(
      "positional_embedding", nn.initializers.normal(0.01), (self.context_length, width)
    )
    self.text_blocks = _blocks(
      self.text_layers,
      self.text_heads,
      self.mlp_ratio,
      self.dtype,
      self.attention,
      self.activation,
      causal=True,
    )
    self.ln_final = LayerNorm(epsilon=EPS)
    self.text_projection = self.param(
      "text_projection", nn.initializers.normal(width**-0.5), (width, self.embed_dim)
    )
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(math.log(1 / 0.07)), (), jnp.float32
    )

  def __call__(self, images: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(image embeddings, text embeddings); creates every parameter at `init`."""
    return self.encode_image(images), self.encode_text(ids)

  def image_blocks(self, images: jax.Array, last: int | None = None) -> list[jax.Array]:
    """The image tower's block outputs 0 .. `last`: (B, 1 + h * w, width) each."""
    return self.visual(images, last=last)

  def encode_image(self, images: jax.Array) -> jax.Array:
    """(B, embed_dim) image embeddings of NHWC images normalised with `MEAN`/`STD`."""
    return self.visual.pool(self.visual(images)[-1])

  def encode_text(self, ids: jax.Array) -> jax.Array:
    """(B, embed_dim) text embeddings of (B, L <= context_length) token ids, pooled at
    each row's largest id (the end-of-text token, as the references find it)."""
    ids = jnp.asarray(ids)
    length = ids.shape[-1]
    if length > self.context_length:
      raise ValueError(f"{length} tokens: this CLIP's context holds {self.context_length}.")
    x = self.token_embedding(ids).astype(jnp.float32) + self.positional_embedding[:length]
    for block in self.text_blocks:
      x = block(x)
    x = self.ln_final(x)
    pooled = jnp.take_along_axis(x, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]
    return jnp.matmul(pooled, self.text_projection, precision=jax.lax.Precision.HIGHEST)

  def image_norm(self, tokens: jax.Array) -> jax.Array:
    """`ln_post` on image tokens (e.g. `patch_tokens(norm=True)`)."""
    return self.visual.norm(tokens)

  def image_project(self, tokens: jax.Array) -> jax.Array:
    """Image tokens into the joint space: ln_post, then `proj`."""
    return self.visual.project(tokens)


def create(variant: str = "vit_b16", **overrides) -> CLIP:
  """A CLIP of a named variant (`VARIANTS`), e.g. `create("vit_l14_336", dtype=jnp.bfloat16)`."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown CLIP variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  return CLIP(**{**VARIANTS[variant], **overrides})


def init_params(model: CLIP, key: jax.Array) -> dict:
  """Random parameters for `model` (its training image size, a full context of ids)."""
  images = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
  ids = jnp.zeros((1, model.context_length), jnp.int32)
  return jax.jit(lambda k: model.init(k, images, ids)["params"])(key)


def param_shapes(model: CLIP) -> dict:
  """The parameter tree of `model` as `jax.ShapeDtypeStruct`s, without allocating."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def architecture(model: CLIP) -> dict:
  """The model's architecture fields (JSON), e.g. to save beside its parameters."""
  return {field: getattr(model, field) for field in ARCH_FIELDS}


def check_ids(ids, vocab_size: int) -> np.ndarray:
  """Token ids as int32 (B, L), checked against the vocabulary on the host (an id out of
  range would silently read another row in XLA)."""
  ids = np.asarray(ids)
  if ids.ndim == 1:
    ids = ids[None]
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"token ids must be integers of shape (B, L), not {ids.dtype} {ids.shape}.")
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(
      f"token id {int(ids.max() if ids.max() >= vocab_size else ids.min())} is outside "
      f"this CLIP's vocabulary of {vocab_size}."
    )
  return ids.astype(np.int32)

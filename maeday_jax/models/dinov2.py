"""The official DINOv2 ViT (facebookresearch/dinov2), in Flax linen.

Module and parameter names mirror the official PyTorch keys (`blocks_3/attn/qkv/kernel`
for `blocks.3.attn.qkv.weight`, `blocks_3/ls1/gamma`), so importing a checkpoint is a
rename table plus transposes (`maeday_jax.models.dinov2_import`). Attention, the MLP and
LayerNorm are the MAE's (`vit_layers`): the same CPU / cuDNN / XLA attention paths.

Other input sizes (any multiple of 14) get the position table resized exactly as the
official `interpolate_pos_encoding` does, which timm and Hugging Face do not: bicubic
(PyTorch's kernel, A = -0.75) with the scale factor `(grid + 0.1) / M` and no antialias
for the original models; for the `_reg` models (with register tokens) the output size
with PyTorch's antialiased bicubic (PIL's filter, a = -0.5) and no offset
(`resize_matrix` computes either as a matrix per axis, on the host).

    net = DinoV2(**VARIANTS["vits14"])
    blocks = net.apply({"params": params}, images)   # [(B, 1 + R + h * w, C)] per block
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.models.vit_layers import Block, LayerNorm

Dtype = Any

# The official hub models (`dinov2/hub/backbones.py`): ViT-S/B/L/g at patch 14, trained at
# 518 px (a 37 x 37 position grid), layer scale, ViT-g with the SwiGLU MLP.
_ORIGINAL = dict(img_size=518, patch_size=14, num_register_tokens=0, interpolate_offset=0.1)
_REG = dict(
  img_size=518,
  patch_size=14,
  num_register_tokens=4,
  interpolate_offset=0.0,
  interpolate_antialias=True,
)
_WIDTHS = {
  "vits14": dict(embed_dim=384, depth=12, num_heads=6),
  "vitb14": dict(embed_dim=768, depth=12, num_heads=12),
  "vitl14": dict(embed_dim=1024, depth=24, num_heads=16),
  "vitg14": dict(embed_dim=1536, depth=40, num_heads=24, ffn="swiglu"),
}
_TEST = dict(img_size=56, patch_size=14, embed_dim=48, depth=3, num_heads=3)
VARIANTS: dict[str, dict[str, Any]] = {
  **{name: {**_ORIGINAL, **width} for name, width in _WIDTHS.items()},
  **{f"{name}_reg": {**_REG, **width} for name, width in _WIDTHS.items()},
  # Tiny models for the tests and their fixtures (tests/fixtures/dinov2_ref_*): "test_reg"
  # has the `_reg` models' registers and resizing, and ViT-g's SwiGLU MLP.
  "test": _TEST,
  "test_reg": {**_REG, **_TEST, "ffn": "swiglu"},
}
FFNS = ("mlp", "swiglu")


# ------------------------------------------------------------------ position resizing


def _cubic(x: float, a: float) -> float:
  """The cubic convolution kernel (Keys) with parameter `a`."""
  x = abs(x)
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  if x < 2.0:
    return (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return 0.0


def resize_matrix(
  in_size: int, out_size: int, scale_factor: float | None = None, antialias: bool = False
) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's 1-D bicubic resize (align_corners=False).

  `scale_factor` given: PyTorch uses it (not out/in) to place the samples, as
  `F.interpolate(scale_factor=...)` does. Without antialias: the `upsample_bicubic2d`
  kernel, A = -0.75, source x = (i + 0.5) / scale_factor - 0.5, four taps clamped at the
  borders. With antialias: the `_upsample_bicubic2d_aa` kernel (PIL's), a = -0.5, its
  support widened by the scale when shrinking, weights normalised to sum to one.
  """
  scale = 1.0 / scale_factor if scale_factor else in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    if not antialias:
      source = scale * (i + 0.5) - 0.5
      first = math.floor(source)
      t = source - first
      taps = (
        _cubic(t + 1.0, -0.75),
        _cubic(t, -0.75),
        _cubic(1.0 - t, -0.75),
        _cubic(2.0 - t, -0.75),
      )
      for offset, weight in enumerate(taps):
        weights[i, min(max(first - 1 + offset, 0), in_size - 1)] += weight
      continue
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (i + 0.5)
    low = max(int(center - support + 0.5), 0)  # int() truncates, as the C++ cast does.
    high = min(int(center + support + 0.5), in_size)
    taps = [_cubic((j - center + 0.5) * inverse, -0.5) for j in range(low, high)]
    total = sum(taps)
    weights[i, low:high] = [t / total for t in taps] if total else taps
  return weights


@functools.lru_cache(maxsize=64)
def _position_matrices(grid: int, rows: int, cols: int, offset: float, antialias: bool):
  if offset:
    return (
      resize_matrix(grid, rows, (rows + offset) / grid, antialias),
      resize_matrix(grid, cols, (cols + offset) / grid, antialias),
    )
  return resize_matrix(grid, rows, None, antialias), resize_matrix(grid, cols, None, antialias)


def resize_positions(
  pos_embed: jax.Array, rows: int, cols: int, offset: float, antialias: bool
) -> jax.Array:
  """The (1, 1 + M * M, C) position table for a `rows` x `cols` patch grid, as the
  official `interpolate_pos_encoding` computes it (unchanged for the training grid)."""
  grid = math.isqrt(pos_embed.shape[1] - 1)
  if rows == grid and cols == grid:
    return pos_embed
  row_w, col_w = _position_matrices(grid, rows, cols, float(offset), bool(antialias))
  table = pos_embed[0, 1:].astype(jnp.float32).reshape(grid, grid, -1)
  resized = jnp.einsum(
    "ri,cj,ijd->rcd",
    jnp.asarray(row_w, jnp.float32),
    jnp.asarray(col_w, jnp.float32),
    table,
    precision=jax.lax.Precision.HIGHEST,
  )
  return jnp.concatenate([pos_embed[:, :1], resized.reshape(1, rows * cols, -1)], axis=1)


# ---------------------------------------------------------------------------- network


class DinoV2(nn.Module):
  """DINOv2 ViT: patch tokens and the class token of every block.

  Attributes:
    img_size: the training input size (sets the position grid, img_size // patch_size).
    patch_size, embed_dim, depth, num_heads, mlp_ratio: the ViT's shape.
    ffn: 'mlp' (ViT-S/B/L) or 'swiglu' (ViT-g).
    num_register_tokens: 0 (original models) or 4 (`_reg` models).
    interpolate_offset, interpolate_antialias: how the position table is resized for
      other input sizes (0.1 / False original, 0.0 / True for `_reg`).
    dtype: compute dtype (parameters, LayerNorms and the residual stream stay float32).
    attention: as for the MAE (`vit_layers.resolve_attention`).
  """

  img_size: int = 518
  patch_size: int = 14
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  ffn: str = "mlp"
  num_register_tokens: int = 0
  interpolate_offset: float = 0.1
  interpolate_antialias: bool = False
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  def setup(self):
    patch, width = self.patch_size, self.embed_dim
    self.patch_embed = nn.Conv(
      width, (patch, patch), strides=(patch, patch), padding="VALID", dtype=self.dtype
    )
    init = nn.initializers.normal(stddev=0.02)
    self.cls_token = self.param("cls_token", init, (1, 1, width), jnp.float32)
    self.pos_embed = self.param("pos_embed", init, (1, 1 + self.grid**2, width), jnp.float32)
    if self.num_register_tokens:
      shape = (1, self.num_register_tokens, width)
      self.register_tokens = self.param("register_tokens", init, shape, jnp.float32)
    self.blocks = [
      Block(
        self.num_heads,
        self.mlp_ratio,
        self.dtype,
        self.attention,
        ffn=self.ffn,
        layer_scale=True,
      )
      for _ in range(self.depth)
    ]
    self.norm = LayerNorm()

  def __call__(self, images: jax.Array, *, last: int | None = None) -> list[jax.Array]:
    """The outputs of blocks 0 .. `last` (default every block) for NHWC images whose
    sides are multiples of `patch_size`: (B, 1 + registers + h * w, C) each, float32."""
    batch, height, width, _ = images.shape
    patch = self.patch_size
    if height % patch or width % patch:
      raise ValueError(f"images of {height}x{width} px: both sides must be multiples of {patch}.")
    x = self.patch_embed(images.astype(self.dtype))
    rows, cols = x.shape[1], x.shape[2]
    x = x.reshape(batch, rows * cols, self.embed_dim).astype(jnp.float32)
    cls = jnp.broadcast_to(self.cls_token, (batch, 1, self.embed_dim))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + resize_positions(
      self.pos_embed, rows, cols, self.interpolate_offset, self.interpolate_antialias
    )
    if self.num_register_tokens:
      shape = (batch, self.num_register_tokens, self.embed_dim)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(self.register_tokens, shape), x[:, 1:]], 1)
    outputs = []
    for block in self.blocks[: (self.depth if last is None else last + 1)]:
      x = block(x)
      outputs.append(x)
    if self.is_initializing():
      self.norm(x)  # Creates the final norm's parameters.
    return outputs

  def normalize(self, tokens: jax.Array) -> jax.Array:
    """The final LayerNorm (the official `norm`), e.g. `model.apply(variables, tokens,
    method="normalize")`."""
    return self.norm(tokens)


def create(variant: str = "vits14", **overrides) -> DinoV2:
  """A DINOv2 of a named variant (`VARIANTS`), e.g. `create("vits14", dtype=jnp.bfloat16)`."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown DINOv2 variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  return DinoV2(**{**VARIANTS[variant], **overrides})


def init_params(model: DinoV2, key: jax.Array) -> dict:
  """Random parameters for `model` (the training-size input)."""
  images = jnp.zeros((1, model.img_size, model.img_size, 3), jnp.float32)
  # One compiled program, not one per operation (hundreds of small compilations).
  return jax.jit(lambda k: model.init(k, images)["params"])(key)


def param_shapes(model: DinoV2) -> dict:
  """The parameter tree of `model` as `jax.ShapeDtypeStruct`s, without allocating."""
  return jax.eval_shape(lambda: init_params(model, jax.random.key(0)))


def architecture(model: DinoV2) -> dict:
  """The model's architecture fields (JSON), e.g. to save beside its parameters."""
  return {
    field: getattr(model, field)
    for field in (
      "img_size",
      "patch_size",
      "embed_dim",
      "depth",
      "num_heads",
      "mlp_ratio",
      "ffn",
      "num_register_tokens",
      "interpolate_offset",
      "interpolate_antialias",
    )
  }

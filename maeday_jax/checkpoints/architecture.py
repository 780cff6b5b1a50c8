"""Infers the MAE architecture from the tensor shapes of an official state dict.

Head counts are not visible in the shapes. Official widths use the official counts
(encoder 768 -> 12, 1024 -> 16, 1280 -> 16; decoder 512 -> 16); other widths use a head
dimension of 64 in the encoder and 32 in the decoder (at least one head). Both can be
overridden (`load_mae(..., num_heads=..., decoder_num_heads=...)`).
"""

import math
import re

import numpy as np

from maeday_jax.checkpoints.errors import CheckpointError
from maeday_jax.checkpoints.state_dict import DECODER_KEYS

OFFICIAL_ENCODER_HEADS = {768: 12, 1024: 16, 1280: 16}
OFFICIAL_DECODER_HEADS = {512: 16}
ENCODER_HEAD_DIM = 64
DECODER_HEAD_DIM = 32


def default_heads(width: int, official: dict[int, int], head_dim: int) -> int:
  """Head count for a width: the official one if known, else width / head_dim."""
  return official.get(width, max(1, width // head_dim))


def _count_blocks(state: dict, stack: str) -> int:
  indices = {int(m.group(1)) for k in state if (m := re.match(rf"{stack}\.(\d+)\.", k))}
  return max(indices) + 1 if indices else 0


def infer(
  state: dict[str, np.ndarray],
  source: str,
  num_heads: int | None = None,
  decoder_num_heads: int | None = None,
) -> dict:
  """Returns `MaskedAutoencoder` keyword arguments that fit `state`'s tensors."""
  if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
    raise CheckpointError(
      f"{source}: no 'patch_embed.proj.weight'/'pos_embed' tensors; this is not an MAE "
      "checkpoint (expected the official MAE keys or Hugging Face ViTMAEForPreTraining names)."
    )
  if not all(k in state for k in DECODER_KEYS):
    raise CheckpointError(
      f"{source}: the checkpoint has no decoder ({', '.join(DECODER_KEYS)} are missing). "
      "Encoder-only files such as mae_pretrain_vit_*.pth cannot reconstruct images; use the "
      "checkpoints with the decoder (mae_visualize_vit_base/large/huge.pth, or the names "
      "mae_vit_base, mae_vit_large, mae_vit_huge, mae_vit_large_ganloss)."
    )
  embed_dim, in_chans, patch, patch_w = np.shape(state["patch_embed.proj.weight"])
  num_tokens = np.shape(state["pos_embed"])[1]
  grid = math.isqrt(num_tokens - 1)
  if patch != patch_w or grid * grid != num_tokens - 1:
    raise CheckpointError(
      f"{source}: non-square patches ({patch}x{patch_w}) or patch grid ({num_tokens - 1} "
      "patches) are not supported."
    )
  decoder_embed_dim = np.shape(state["decoder_embed.weight"])[0]
  depth = _count_blocks(state, "blocks")
  mlp_hidden = np.shape(state["blocks.0.mlp.fc1.weight"])[0] if depth else 4 * embed_dim
  arch = dict(
    img_size=int(grid * patch),
    patch_size=int(patch),
    in_chans=int(in_chans),
    embed_dim=int(embed_dim),
    depth=depth,
    num_heads=num_heads or default_heads(embed_dim, OFFICIAL_ENCODER_HEADS, ENCODER_HEAD_DIM),
    decoder_embed_dim=int(decoder_embed_dim),
    decoder_depth=_count_blocks(state, "decoder_blocks"),
    decoder_num_heads=decoder_num_heads
    or default_heads(decoder_embed_dim, OFFICIAL_DECODER_HEADS, DECODER_HEAD_DIM),
    mlp_ratio=float(mlp_hidden / embed_dim),
  )
  for field, width in (("num_heads", embed_dim), ("decoder_num_heads", decoder_embed_dim)):
    if width % arch[field]:
      raise CheckpointError(
        f"{source}: width {width} is not divisible by {field}={arch[field]}; pass "
        f"{field}=... to load_mae."
      )
  return arch

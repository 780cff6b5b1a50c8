"""Fixed 2-D sine-cosine position embeddings, as in the official MAE release.

The official checkpoints store these tables as (non-trainable) parameters; the model
loads them like any other weight and never updates them. This module recreates them for
freshly initialised models.
"""

import numpy as np


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
  """Embeds positions (M,) as [sin(pos * omega), cos(pos * omega)] of width `dim`."""
  if dim % 2:
    raise ValueError(f"1-D sin-cos embedding width must be even, got {dim}.")
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, with_cls_token: bool = True) -> np.ndarray:
  """Returns the (grid_size**2 [+1], dim) table of the official `get_2d_sincos_pos_embed`.

  Half of the channels encode the column (x) coordinate and half the row (y); the
  column half comes first, matching the official `np.meshgrid(grid_w, grid_h)` order.
  With `with_cls_token`, a zero row is prepended for the class token.
  """
  if dim % 4:
    raise ValueError(f"2-D sin-cos embedding width must be divisible by 4, got {dim}.")
  coords = np.arange(grid_size, dtype=np.float64)
  cols, rows = np.meshgrid(coords, coords)  # cols varies along the last axis.
  table = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  if with_cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)

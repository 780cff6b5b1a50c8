"""Few-shot selection: which k normal training images a run learns from."""

from __future__ import annotations

import hashlib

from maeday_jax.data.split import Split


def select_shots(split: Split, k: int, seed: int) -> list[int]:
  """Indices of `k` training examples chosen deterministically from `seed`.

  Every example is ranked by the SHA-256 of `"<seed>/<file name>"` and the first `k` are
  taken. The choice depends only on the seed and the file names, not on NumPy's random
  streams nor on the order of the split, so every method (and every machine, and every
  rebuild of the cache) given the same seed gets the same shots, and different seeds give
  different draws.

  Args:
    split: the training split (normal images).
    k: number of shots; 0 gives none.
    seed: the shot-selection seed.

  Returns:
    the chosen indices into `split`, in ranking order.

  Raises:
    ValueError: when `k` is negative or larger than the split.
  """
  if k < 0:
    raise ValueError(f"k must be >= 0, got {k}")
  if k > len(split):
    raise ValueError(f"cannot choose {k} shots from {split}: it has only {len(split)} images")

  def rank(index: int) -> str:
    return hashlib.sha256(f"{seed}/{split.file_name(index)}".encode()).hexdigest()

  return sorted(range(len(split)), key=rank)[:k]

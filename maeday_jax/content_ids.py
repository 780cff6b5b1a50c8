"""Content ids: what an image's randomness (MAEDAY's masks) is drawn from.

NumPy and the standard library only, so that an exported detector (`maeday_jax.exported`)
computes them exactly as the library does, without any model code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def image_ids(images: Sequence[np.ndarray | bytes | str]) -> np.ndarray:
  """(B, 2) uint32: the first 64 bits of the SHA-256 of each image's content.

  The identity an image's masks are drawn from: its pixels as the model reads them (an
  array's bytes; bytes or a string are hashed as given). Byte-identical copies of an
  image therefore get the same masks and the same score, and an image's masks do not
  depend on its name, its position or the other images. 64 bits: two of a million
  different images share masks with probability ~3e-8.
  """

  def digest(item) -> bytes:
    if isinstance(item, str):
      item = item.encode("utf-8")
    elif not isinstance(item, bytes):
      item = np.ascontiguousarray(item).tobytes()
    return hashlib.sha256(item).digest()[:8]

  digests = b"".join(digest(item) for item in images)
  return np.frombuffer(digests, ">u4").astype(np.uint32).reshape(len(images), 2)

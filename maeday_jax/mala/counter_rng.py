"""Counter-based random numbers for the synthetic-anomaly generator (`mala.synthetic`).

Each public generator function turns its key into two 32-bit seed words with one small
`jax.random.bits` call (`seed`) and derives every other random number (per image, per
parameter, per lattice point, per pixel) by hashing counters with them (`hash_words`,
`uniform`). Elementwise integer hashes compile in a fraction of the time of one threefry
call per parameter or per array (on CPU, several seconds per function otherwise), and
stay deterministic given the key.

Hash streams (`STREAM_*`): the first word hashed, so that no two uses of a seed share
numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

STREAM_GRADIENT = 0  # + octave
STREAM_PARAMS = 16
STREAM_IMAGE = 17
STREAM_PIXEL = 18


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
  """(H, W) from an int (square) or a pair, checked positive."""
  hw = (int(size), int(size)) if np.ndim(size) == 0 else tuple(int(s) for s in size)
  if len(hw) != 2 or min(hw) < 1:
    raise ValueError(f"size must be a positive int or (height, width), got {size!r}.")
  return hw


def seed(key: jax.Array) -> jax.Array:
  """The two uint32 seed words of a key (typed or raw)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def mix(x: jax.Array) -> jax.Array:
  """Chris Wellons' `lowbias32` integer finaliser: every input bit flips ~half the output."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def to_u32(x) -> jax.Array:
  """Integers (negative ones too, two's complement) as uint32."""
  x = jnp.asarray(x)
  if x.dtype == jnp.uint32:
    return x
  return jax.lax.bitcast_convert_type(x.astype(jnp.int32), jnp.uint32)


def hash_words(seed_words: jax.Array, *words) -> jax.Array:
  """A uint32 hash of integer arrays (broadcast together) under `seed_words` (2,) uint32."""
  h = mix(seed_words[0] ^ mix(seed_words[1] + jnp.uint32(0x9E3779B9)))
  for word in words:
    h = mix(h ^ to_u32(word)) + jnp.uint32(0x9E3779B9)
  return mix(h)


def uniform(seed_words: jax.Array, *words) -> jax.Array:
  """U[0, 1) float32 from `hash_words` (24 random bits, exactly representable)."""
  return (hash_words(seed_words, *words) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def child_seeds(seed_words: jax.Array, stream: int, count: int) -> jax.Array:
  """`count` independent seeds (count, 2) derived from `seed_words`, one per image."""
  index = jnp.arange(count, dtype=jnp.uint32)[:, None]
  return hash_words(seed_words, stream, index, jnp.arange(2, dtype=jnp.uint32)[None, :])


def pick(u: jax.Array, n: int) -> jax.Array:
  """An integer in {0, ..., n - 1} from U[0, 1)."""
  return jnp.minimum((u * n).astype(jnp.int32), n - 1)

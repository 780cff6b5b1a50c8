"""Streaming fixed-size batches of model inputs from a split, one shard per JAX process.

- Preprocessing: images are resized straight to `image_size` x `image_size` with Pillow's
  bilinear filter (antialiased when shrinking; aspect ratio not kept, as in MAEDAY) and
  normalised with the ImageNet mean and std; masks are resized with Pillow's nearest
  neighbour (`maeday_jax.resizing`).
- Sharding: process `i` of `n` reads the contiguous range
  `[i * N // n, (i + 1) * N // n)` of the N examples, so the shards cover every example
  exactly once.
- Lock step: every shard yields the same number of batches,
  `ceil(ceil(N / n) / batch_size)`, padding with invalid examples (and, for a shorter
  shard, whole invalid batches), so a jitted step that runs collectives across hosts is
  entered the same number of times everywhere. Use `valid` to ignore padding.
- Overlap and memory: `num_workers` threads decode and resize the examples of the next
  `prefetch` batches while the current one is consumed; at most
  `(prefetch + 1) * batch_size` examples are in memory, however large the split.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

from maeday_jax import resizing
from maeday_jax.data import preprocess
from maeday_jax.data.errors import DataError
from maeday_jax.data.prefetch import prefetched
from maeday_jax.data.split import Split

logger = logging.getLogger(__name__)


def shard_bounds(num_examples: int, shard_index: int, shard_count: int) -> tuple[int, int]:
  """[start, stop) of shard `shard_index` of `shard_count` contiguous, balanced shards."""
  if shard_count < 1 or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
  return shard_index * num_examples // shard_count, (shard_index + 1) * num_examples // shard_count


def batches_per_shard(num_examples: int, batch_size: int, shard_count: int) -> int:
  """How many batches every shard yields: enough for the largest shard."""
  return math.ceil(math.ceil(num_examples / shard_count) / batch_size)


def original_mask_size(height: int, width: int, max_side: int) -> tuple[int, int]:
  """(h, w) of a mask kept at its original size, its longer side capped at `max_side`
  (the aspect ratio kept, each side at least 1)."""
  scale = min(1.0, max_side / max(height, width))
  return max(1, round(height * scale)), max(1, round(width * scale))


def load_example(
  split: Split, index: int, image_size: int, original_masks: int = 0, aspect=None
) -> dict:
  """Reads example `index` and turns it into model inputs (see the module docstring);
  `original_masks` > 0 also keeps its mask at the original size, longer side capped there;
  `aspect` (a `resizing.KeepAspect`) reads the image with its aspect ratio kept, while its
  mask stays at `image_size`."""
  example = split[index]
  loaded = {
    "image": preprocess.preprocess_image(example["image"], aspect or image_size),
    "mask": resizing.resize_mask_pillow(example["mask"], image_size),
    "label": example["label"],
    "file_name": example["file_name"],
    "original_size": example["image"].shape[:2],
  }
  if original_masks > 0:
    size = original_mask_size(*example["mask"].shape[:2], original_masks)
    loaded["mask_original"] = resizing.resize_mask_pillow(example["mask"], size)
  return loaded


def _empty_batch(batch_size: int, image_size: int, listed: bool = False) -> dict:
  return {
    "image": (
      [None] * batch_size  # Images of their own sizes.
      if listed
      else np.zeros((batch_size, image_size, image_size, 3), np.float32)
    ),
    "mask": np.zeros((batch_size, image_size, image_size), np.uint8),
    "label": np.full((batch_size,), -1, np.int32),
    "valid": np.zeros((batch_size,), bool),
    "index": np.full((batch_size,), -1, np.int32),
    "file_name": [""] * batch_size,
    "original_size": np.zeros((batch_size, 2), np.int32),
    "mask_original": [None] * batch_size,
  }


def _assemble(
  split: Split, slots, futures, batch_size: int, image_size: int, listed: bool = False
) -> dict:
  batch = _empty_batch(batch_size, image_size, listed)
  for row, (index, future) in enumerate(zip(slots, futures, strict=True)):
    if future is None:
      continue
    try:
      example = future.result()
    except DataError as e:  # Validated when prepared; reaching here means the cache is damaged.
      logger.error("Cannot read %s[%d]: %s", split, index, e)
      split.skipped.append((f"{split}/{index}", str(e)))
      batch["index"][row] = index
      continue
    batch["image"][row] = example["image"]
    batch["mask"][row] = example["mask"]
    batch["label"][row] = example["label"]
    batch["valid"][row] = True
    batch["index"][row] = index
    batch["file_name"][row] = example["file_name"]
    batch["original_size"][row] = example["original_size"]
    batch["mask_original"][row] = example.get("mask_original")
  return batch


def batches(
  split: Split,
  batch_size: int,
  image_size: int = 224,
  *,
  shard_index: int | None = None,
  shard_count: int | None = None,
  num_workers: int = 4,
  prefetch: int = 2,
  indices: Sequence[int] | None = None,
  original_masks: int = 0,
  aspect=None,
) -> Iterator[dict]:
  """Yields fixed-size batches of this process's shard of `split`.

  Args:
    split: the split to read.
    batch_size: examples per batch (the last one is padded).
    image_size: the model's square input size.
    shard_index: this shard, default `jax.process_index()`.
    shard_count: number of shards, default `jax.process_count()`.
    num_workers: decoding threads.
    prefetch: batches prepared ahead of the one being consumed.
    indices: read only these examples of the split (e.g. the few-shot images), in order;
      default all.
    original_masks: > 0: also `mask_original`, each mask at its original size with its
      longer side capped at this (a list, None for padding); 0: none.
    aspect: None: images square at `image_size`; a `resizing.KeepAspect`: read with
      their aspect ratio kept, and `image` a list of (h, w, 3) arrays (None for padding),
      for steps that tile each image (`batch_step.is_native`).

  Yields:
    dicts with `image` float32 (B, S, S, 3) normalised (with `aspect`: a list), `mask`
    uint8 (B, S, S) in {0, 1},
    `label` int32 (B,) (-1 for padding), `valid` bool (B,), `index` int32 (B,) (into the
    split, -1 for padding), `file_name` list[str] ('' for padding) and `original_size`
    int32 (B, 2) as (height, width). An example that fails to decode is reported, added
    to `split.skipped` and left invalid (its `index` kept).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if shard_index is None or shard_count is None:
    import jax  # Only needed for the defaults; keeps this module cheap to import.

    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  order = list(range(len(split))) if indices is None else [int(i) for i in indices]
  start, stop = shard_bounds(len(order), shard_index, shard_count)
  num_batches = batches_per_shard(len(order), batch_size, shard_count)
  slots = order[start:stop] + [-1] * (num_batches * batch_size - (stop - start))

  def chunk(batch: int) -> list[int]:
    return slots[batch * batch_size : (batch + 1) * batch_size]

  def tasks(batch: int) -> list:
    return [
      functools.partial(load_example, split, i, image_size, original_masks, aspect)
      if i >= 0
      else None
      for i in chunk(batch)
    ]

  def assemble(batch: int, futures: list) -> dict:
    return _assemble(split, chunk(batch), futures, batch_size, image_size, aspect is not None)

  yield from prefetched(
    range(num_batches),
    tasks,
    assemble,
    num_workers=num_workers,
    prefetch=prefetch,
    thread_name_prefix="data",
  )

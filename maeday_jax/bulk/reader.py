"""Decoding one process's images in fixed-size batches, ahead of the model.

`num_workers` threads read and preprocess (`data.images.read_image`, then
`data.preprocess.preprocess_image`: resized to the model's input, ImageNet-normalised)
the images of the next `prefetch` batches while the current one is scored, so at most
`(prefetch + 1) * batch_size` images are in memory. Batch `b` always holds the shard
positions `[b * batch_size, (b + 1) * batch_size)`; positions past the shard's end are
padding (`valid` False, position -1), so the last batch, and any batch past a short
shard's end, has the same shape. A file that cannot be read is reported in the batch's
`skipped` (position, path, reason) and left invalid; it never stops the run.

Each file is `os.stat`-ed just before it is read, and its size and modification time
(`stats`) go into the commit records, so that a rerun can tell whether the file changed
since it was scored (`shards.changed_inputs`). Stat-ing first errs on the safe side: a
file written after the stat, even while it is being read, has a newer modification time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence

import numpy as np

from maeday_jax.data.errors import DataError
from maeday_jax.data.images import read_image
from maeday_jax.data.prefetch import prefetched
from maeday_jax.data.preprocess import preprocess_image


@dataclasses.dataclass
class Batch:
  """One fixed-size batch of a shard.

  Attributes:
    index: the batch's number in the shard (its positions start at index * batch size).
    images: float32 (B, S, S, 3) model inputs (zeros where not valid); with `aspect`
      a list of (h, w, 3) arrays (None where not valid).
    valid: bool (B,): a decoded image.
    positions: int64 (B,): each row's position in the shard, -1 for padding.
    skipped: (position, path, reason) of the files of this batch that could not be read.
    stats: int64 (B, 2): each row's file size and modification time (`st_mtime_ns`) when
      it was read, `MISSING` where there is no file (or padding).
  """

  index: int
  images: np.ndarray | list
  valid: np.ndarray
  positions: np.ndarray
  skipped: list[tuple[int, str, str]]
  stats: np.ndarray | None = None

  @property
  def covered(self) -> int:
    """How many shard positions this batch accounts for (scored or skipped)."""
    return int((self.positions >= 0).sum())


# (size, st_mtime_ns) of a file that cannot be stat-ed (missing, a broken link).
MISSING = (-1, -1)


def file_stat(path: str) -> tuple[int, int]:
  """(size, st_mtime_ns) of the file at `path` (links followed), or `MISSING`."""
  try:
    stat = os.stat(path)
  except OSError:
    return MISSING
  return stat.st_size, stat.st_mtime_ns


def load_image(path: str, image_size: int, aspect=None) -> np.ndarray:
  """One file as a normalised float32 (image_size, image_size, 3) model input (`aspect`,
  a `resizing.KeepAspect`: its aspect ratio kept)."""
  return preprocess_image(read_image(path), aspect or image_size)


def _load(
  path: str, image_size: int, aspect=None
) -> tuple[np.ndarray | None, tuple[int, int], str]:
  """(input or None, stat, reason it cannot be read): the stat is taken before reading."""
  stat = file_stat(path)
  try:
    return load_image(path, image_size, aspect), stat, ""
  except Exception as e:  # An unreadable file must never stop the run.
    return None, stat, _reason(e)


def _reason(error: BaseException) -> str:
  if isinstance(error, DataError):
    return error.reason
  return f"cannot decode ({type(error).__name__}: {error})"


def num_batches(count: int, batch_size: int) -> int:
  """Batches needed for `count` positions."""
  return -(-count // batch_size)


def read_batches(
  paths: Sequence[str],
  batch_size: int,
  image_size: int,
  *,
  first_batch: int = 0,
  stop_batch: int | None = None,
  num_workers: int = 4,
  prefetch: int = 2,
  aspect=None,
) -> Iterator[Batch]:
  """Yields batches `first_batch, ..., stop_batch - 1` of the shard whose files are `paths`.

  Args:
    paths: this shard's files, in shard order (position i is `paths[i]`).
    batch_size: rows per batch.
    image_size: the square model input size.
    first_batch: the first batch to yield (resuming).
    stop_batch: one past the last batch (default: enough for `paths`); batches past the
      shard's end are all padding, so every process can run the same number.
    num_workers: decoding threads.
    prefetch: batches decoded ahead of the one being consumed.
    aspect: a `resizing.KeepAspect`: images keep their aspect ratio (`load_image`) and a
      batch's `images` is a list (None for padding and unreadable files), for a native
      step.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  stop_batch = num_batches(len(paths), batch_size) if stop_batch is None else stop_batch

  def positions_of(batch: int) -> list[int]:
    start = batch * batch_size
    return [p for p in range(start, start + batch_size) if p < len(paths)]

  def tasks(batch: int) -> list:
    return [functools.partial(_load, paths[p], image_size, aspect) for p in positions_of(batch)]

  def assemble(batch: int, futures: list) -> Batch:
    positions = positions_of(batch)
    images = (
      [None] * batch_size
      if aspect is not None
      else np.zeros((batch_size, image_size, image_size, 3), np.float32)
    )
    valid = np.zeros((batch_size,), bool)
    rows = np.full((batch_size,), -1, np.int64)
    stats = np.full((batch_size, 2), MISSING[0], np.int64)
    skipped = []
    for row, (position, future) in enumerate(zip(positions, futures, strict=True)):
      rows[row] = position
      try:
        image, stats[row], reason = future.result()
      except Exception as e:  # An unreadable file must never stop the run.
        image, reason = None, _reason(e)
      if image is None:
        skipped.append((position, str(paths[position]), reason))
        continue
      images[row] = image
      valid[row] = True
    return Batch(batch, images, valid, rows, skipped, stats)

  yield from prefetched(
    range(first_batch, stop_batch),
    tasks,
    assemble,
    num_workers=num_workers,
    prefetch=prefetch,
    thread_name_prefix="bulk",
  )

"""Training images for MAE pre-training: read once, kept in memory, batched by step.

Anomaly-detection training sets are small (MVTec AD: 3,629 normal images, all 15
categories; VisA: ~8,700), so every process reads the whole selection once, resized to
`load_size` and kept as uint8 (150 KB per image at 224 px), and builds each global batch
from a permutation that depends only on the seed and the epoch. Batch t is therefore a
pure function of (seed, t): a resumed run sees exactly the batches an uninterrupted one
would, and each process feeds its own rows of the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import jax
import ml_collections
import numpy as np

from maeday_jax import data

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Source:
  """One split of one category of one dataset."""

  data_config: ml_collections.ConfigDict
  category: str
  split: str

  def __str__(self) -> str:
    return f"{self.data_config.name}:{self.data_config.path or ''}/{self.category}/{self.split}"


def _split_names(value) -> list[str]:
  names = value.split(",") if isinstance(value, str) else list(value)
  names = [str(n).strip() for n in names if str(n).strip()]
  if not names:
    raise ValueError("A training data source needs at least one split in `splits`.")
  return names


def training_sources(data_configs: Iterable[ml_collections.ConfigDict]) -> list[Source]:
  """Every (dataset, category, split) the data configs select.

  Each config is a `data.get_data_config()` with an extra `splits` field ('train',
  'train,test', ...; default 'train'); `categories` selects categories as usual, so
  `categories='all'` trains one unified model on every category of the dataset.
  """
  sources = []
  for data_config in data_configs:
    for category in data.resolve_categories(data_config):
      for split in _split_names(data_config.get("splits", "train")):
        sources.append(Source(data_config, category, split))
  return sources


def load_images(
  sources: Sequence[Source],
  image_size: int,
  normal_only: bool = True,
  num_workers: int = 4,
  aspect=None,
) -> tuple[np.ndarray | list[np.ndarray], list[str]]:
  """Reads the images of `sources` as uint8 (N, S, S, 3), with their names (`aspect`, a
  `resizing.KeepAspect`: a list of (h, w, 3) images, their aspect ratio kept).

  Args:
    sources: what to read.
    image_size: S; images are resized as the input pipeline does (bilinear, square).
    normal_only: drop images labelled anomalous (a test split may contribute its normal
      images; unlabelled images, label -1, are kept).
    num_workers: decoding threads.
  """
  chunks, names = [], []
  for source in sources:
    split = data.load_split(source.data_config, source.category, source.split)
    kept = 0
    for batch in data.batches(
      split,
      32,
      image_size,
      shard_index=0,
      shard_count=1,
      num_workers=num_workers,
      aspect=aspect,
    ):
      keep = batch["valid"] & ((batch["label"] != 1) if normal_only else True)
      if not keep.any():
        continue
      if aspect is not None:  # A list: the images differ in size.
        chunks.append([data.denormalize(batch["image"][i]) for i in np.flatnonzero(keep)])
      else:
        chunks.append(data.denormalize(batch["image"][keep]))
      names.extend(f"{source}/{n}" for n, k in zip(batch["file_name"], keep, strict=True) if k)
      kept += int(keep.sum())
    logger.info("%s: %d of %d images used for training", source, kept, len(split))
    if split.skipped:
      logger.warning("%s", data.skipped_summary([split]))
  if not chunks:
    raise data.DataError(
      "No training images: the selected sources "
      f"({', '.join(str(s) for s in sources)}) hold no usable normal images."
    )
  if aspect is not None:
    return [image for chunk in chunks for image in chunk], names
  return np.concatenate(chunks), names


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per pass over the data (the remainder waits for the next epoch's
  shuffle); at least 1, a set smaller than the batch is repeated to fill it."""
  return max(1, num_examples // batch_size)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Indices of the global batch of step `step`: a pure function of (seed, step)."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(int(step), per_epoch)
  order = np.random.default_rng([int(seed), epoch]).permutation(num_examples)
  if num_examples < batch_size:
    order = np.resize(order, batch_size)  # Tiny sets: repeat the shuffled set.
  return order[position * batch_size : (position + 1) * batch_size]


def local_rows(global_batch_size: int) -> slice:
  """This process's rows of a global batch (process-contiguous, as the mesh expects)."""
  per_process = global_batch_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


@dataclasses.dataclass(frozen=True)
class AspectImages:
  """Training images kept at their own aspect ratio (`load_short_side`), different sizes;
  each step trains on one random `tile` x `tile` window of each batch image (whole pixels,
  no resampling), cut here on the host: the tiles the scoring of images at their own size
  cuts (`maeday_jax.tiling_native`). A window's position is a pure function of (seed,
  step, row of the global batch), so a resumed run, or another process count, sees the
  same tiles."""

  images: list[np.ndarray]  # uint8 (h, w, 3), both sides >= `tile`.
  tile: int

  def __len__(self) -> int:
    return len(self.images)

  def windows(self, indices: np.ndarray, rows: slice, step: int, seed: int) -> np.ndarray:
    """(len(rows), tile, tile, 3) uint8: a random window of each image `indices[rows]`
    (`indices`: the global batch)."""
    tile, out = self.tile, []
    for row in range(len(indices))[rows]:
      image = self.images[int(indices[row])]
      rng = np.random.default_rng([int(seed), int(step), row])
      top = int(rng.integers(0, image.shape[0] - tile + 1))
      left = int(rng.integers(0, image.shape[1] - tile + 1))
      out.append(image[top : top + tile, left : left + tile])
    return np.stack(out)

  def all_tiles(self) -> np.ndarray:
    """Every image's non-overlapping tiles (the last of a row or column flush with the
    border), (M, tile, tile, 3) uint8: e.g. what a codebook is fitted on."""
    from maeday_jax import tiling

    tile, out = self.tile, []
    for image in self.images:
      for top in tiling.tile_starts(image.shape[0], tile, tile):
        for left in tiling.tile_starts(image.shape[1], tile, tile):
          out.append(image[top : top + tile, left : left + tile])
    return np.stack(out)


def load_aspect_images(
  sources: Sequence[Source],
  short_side: int,
  tile: int,
  normal_only: bool = True,
  num_workers: int = 4,
) -> AspectImages:
  """The images of `sources` with their aspect ratio kept (short side `short_side` px, or
  -1: their own size), any image whose short side is below `tile` enlarged to it."""
  from maeday_jax.resizing import KeepAspect

  aspect = KeepAspect(short_side, tile)
  images, _ = load_images(sources, tile, normal_only, num_workers, aspect=aspect)
  return AspectImages(images, int(tile))


def load_training_images(
  sources: Sequence[Source],
  load_size: int,
  tile: int,
  short_side: int = 0,
  normal_only: bool = True,
  num_workers: int = 4,
):
  """What a trainer steps through (`batch_images`): uint8 (N, L, L, 3) images square at
  `load_size`, or, with `short_side` != 0 (`load_short_side`), an `AspectImages` of
  `tile` windows of the images with their aspect ratio kept."""
  if short_side:
    return load_aspect_images(sources, short_side, tile, normal_only, num_workers)
  images, _ = load_images(sources, load_size, normal_only, num_workers)
  return images


def all_grey(images) -> bool:
  """Whether every training image (`load_training_images`) is grey (three equal channels)."""
  listed = images.images if isinstance(images, AspectImages) else [images]
  return all(bool(np.all(x[..., :1] == x[..., 1:])) for x in listed)


def device_tile(images, tile: int) -> int:
  """The tile side a train step still cuts on device from `images` (`load_training_images`):
  0 when the host already cut windows or the images are at most one tile, else `tile`."""
  if isinstance(images, AspectImages) or images.shape[1] <= tile:
    return 0
  return tile


def batch_images(images, indices: np.ndarray, rows: slice, step: int, seed: int) -> np.ndarray:
  """This process's rows of the global batch `indices` of step `step`: the images
  themselves, or with `AspectImages` a random tile of each."""
  if isinstance(images, AspectImages):
    return images.windows(indices, rows, step, seed)
  return images[indices[rows]]

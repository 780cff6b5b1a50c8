"""Tiled scoring: small defects survive when each part of the image is scored at the
model's resolution.

With `--config.tiling.mode=tiles` a detector reads each image at `tiling.image_size`
(square, like every input here), cuts it into overlapping tiles of `tile_size` with
`stride` (the last tile of a row or column flush with the border, so uneven sizes are
covered without padding), scores the tiles with its own pure score function (tiles
resized to its input size when they differ), and stitches the tiles' maps back at
`image_size`, averaging (or taking the maximum of) the overlaps. The image score is the
detector's own rule over the tiles (`Detector.tiled_image_scores`: the largest tile
score by default, which for the kNN detectors is the score of the most anomalous patch of
any tile; the maximum of the stitched map for MAEDAY).

Images that keep their aspect ratio (`tiling.resize_short_side`) are cut on the host
instead, each at its own size: `maeday_jax.tiling_native`.

Everything happens inside the one jitted score function (`tiled`): the jobs, the bulk
engine, evaluation and export see a detector that takes `image_size` images, and the
tiles of every image of a device's batch are scored together, at most `max_tiles` per
device pass (more are scored in sequential chunks, never refused). Fitting on tiles:
`tile_normals` gives a detector the tiles of its normal images as its shots (memory
banks of tiles' patches, adapters trained on tiles).

    tiling = Tiling(image_size=448, tile_size=224, stride=112, model_size=224)
    tiles = cut(images, tiling)             # (B * 9, 224, 224, 3)
    maps = stitch(tile_maps, tiling)        # (B, 448, 448)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.config_errors import ConfigError
from maeday_jax.resizing import KeepAspect
from maeday_jax.settings import tiling as tiling_settings

# Tiles of one image get distinct content ids (their masks differ) derived from the
# image's: the tile index times this odd constant, XOR-ed into the id's second word.
_TILE_ID_STEP = 0x9E3779B9


# How `Tiling.describe` names the reads that are not a resize to a short side.
_NATIVE_READS = {-1: "its own size"}


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Where the tiles of an `image_size` x `image_size` image are and how they are scored.

  Attributes:
    image_size: the side of the (resized) image the tiles are cut from.
    tile_size: the tile side, in pixels of that image.
    stride: pixels between consecutive tiles.
    model_size: the detector's input size (tiles are resized to it when they differ).
    combine: 'mean' or 'max' over overlapping tiles.
    max_tiles: most tiles per device pass.
    with_global: also score the whole image at the model's size (mode 'tiles+global'): the
      maps and scores are the mean of the tiled and the whole-image ones.
    short_side: 0: images are read square at `image_size`; > 0: read with their aspect
      ratio kept, short side this many pixels; -1: at their own size. Not 0: the tiles
      are cut on the host (`maeday_jax.tiling_native`), and `image_size` is the size the
      stitched maps are handed on at.
  """

  image_size: int
  tile_size: int
  stride: int
  model_size: int
  combine: str = "mean"
  max_tiles: int = 64
  with_global: bool = False
  short_side: int = 0

  @property
  def native(self) -> bool:
    """Whether images keep their aspect ratio (tiles cut on the host, per image)."""
    return self.short_side != 0

  @property
  def aspect(self) -> KeepAspect | None:
    """How images are read when `native` (short side, and at least one tile), else None."""
    return KeepAspect(self.short_side, self.tile_size) if self.native else None

  @property
  def starts(self) -> tuple[int, ...]:
    return tile_starts(self.image_size, self.tile_size, self.stride)

  @property
  def positions(self) -> tuple[tuple[int, int], ...]:
    """(top, left) of every tile, row by row."""
    return tuple((top, left) for top in self.starts for left in self.starts)

  @property
  def count(self) -> int:
    return len(self.starts) ** 2

  def describe(self) -> str:
    if self.native:
      read = _NATIVE_READS.get(self.short_side, f"short side {self.short_side} px, aspect kept")
      images = f"each image ({read}; maps handed on at {self.image_size} px)"
    else:
      images = f"{self.image_size} px images"
    return (
      f"{'' if self.native else f'{self.count} '}tiles of {self.tile_size} px (stride "
      f"{self.stride}) of {images}, {self.combine} over overlaps"
      + (", with the whole image" if self.with_global else "")
    )


def warn_if_training_reads_differ(grid: Tiling | None, load_short_side: int, field: str) -> None:
  """Logs a warning when a network trains on tiles of images read otherwise than it will
  score them (`field`'s `load_short_side` against `tiling.resize_short_side`): the
  texture's scale then differs between training and scoring, which is allowed (it can
  even be chosen on a validation split) but rarely meant."""
  scored = 0 if grid is None else grid.short_side
  if int(load_short_side or 0) != scored:
    logging.getLogger("maeday_jax").warning(
      "--config.%s=%s but tiling.resize_short_side=%s: the network trains on tiles of "
      "images read otherwise than it scores them (set both alike unless that is meant).",
      field,
      load_short_side,
      scored,
    )


def tile_starts(length: int, tile: int, stride: int) -> tuple[int, ...]:
  """Tile offsets along one side: 0, stride, 2 * stride, ... and, when those leave the
  far border uncovered, one more tile against it."""
  if tile >= length:
    return (0,)
  starts = list(range(0, length - tile + 1, stride))
  if starts[-1] != length - tile:
    starts.append(length - tile)
  return tuple(starts)


def from_settings(section, model_size: int) -> Tiling | None:
  """The `Tiling` of a detector's `tiling` settings section, or None when it scores whole
  images (mode 'none', or no section: artifacts written before tiling existed).

  Raises:
    ConfigError: invalid settings (naming the field).
  """
  if section is None or section.get("mode", "none") == "none":
    return None
  found = tiling_settings.problems(section)
  tile = int(section.tile_size) or int(model_size)
  image = int(section.image_size) or 2 * tile
  stride = int(section.stride) or max(tile // 2, 1)
  short_side = int(section.get("resize_short_side", 0))  # Not 0: `image_size` sizes maps only.
  if not found and tile > image and not short_side:
    found.append(("tile_size", f"the tile ({tile} px) is larger than the image ({image} px)."))
  if not found and 0 < short_side < tile:
    found.append(
      (
        "resize_short_side",
        f"{short_side} px is below the tile ({tile} px): images would be shrunk, then "
        f"enlarged again to one tile; use at least {tile}, or -1 (their own size).",
      )
    )
  if not found and stride > tile:
    found.append(("stride", f"{stride} is larger than the tile ({tile} px)."))
  if found:
    field, message = found[0]
    raise ConfigError(f"--config.tiling.{field}: {message}")
  return Tiling(
    image,
    tile,
    stride,
    int(model_size),
    str(section.combine),
    int(section.max_tiles),
    with_global=section.mode == "tiles+global",
    short_side=short_side,
  )


def resize_square(x: jax.Array, size: int) -> jax.Array:
  """(N, s, s[, C]) -> (N, size, size[, C]), bilinear with antialiasing (as the inputs)."""
  if x.shape[1] == size:
    return x
  return jax.image.resize(x, (x.shape[0], size, size, *x.shape[3:]), "linear", antialias=True)


def cut(images: jax.Array, tiling: Tiling, size: int | None = None) -> jax.Array:
  """(B, S, S, C) images -> (B * n, M, M, C) tiles, image by image, at `size` (default:
  the model's)."""
  tile = tiling.tile_size
  tiles = jnp.stack([images[:, y : y + tile, x : x + tile] for y, x in tiling.positions], axis=1)
  return resize_square(tiles.reshape(-1, *tiles.shape[2:]), size or tiling.model_size)


def stitch(tile_maps: jax.Array, tiling: Tiling) -> jax.Array:
  """(B * n, m, m) maps of `cut`'s tiles -> (B, S, S) maps: each pixel the mean (or the
  maximum) of the tiles that cover it."""
  size, n = tiling.tile_size, tiling.count
  maps = resize_square(tile_maps, size).reshape(-1, n, size, size)
  full = (maps.shape[0], tiling.image_size, tiling.image_size)
  if tiling.combine == "max":
    stitched = jnp.full(full, -jnp.inf, maps.dtype)
    for i, (y, x) in enumerate(tiling.positions):
      stitched = stitched.at[:, y : y + size, x : x + size].max(maps[:, i])
    return stitched
  total = jnp.zeros(full, maps.dtype)
  for i, (y, x) in enumerate(tiling.positions):
    total = total.at[:, y : y + size, x : x + size].add(maps[:, i])
  return total / jnp.asarray(coverage(tiling), maps.dtype)


def coverage(tiling: Tiling) -> np.ndarray:
  """How many tiles cover each pixel: (S, S) int32, every entry >= 1."""
  counts = np.zeros((tiling.image_size, tiling.image_size), np.int32)
  for y, x in tiling.positions:
    counts[y : y + tiling.tile_size, x : x + tiling.tile_size] += 1
  return counts


def tile_ids(ids, count: int):
  """(B, 2) image content ids -> (B * count, 2): each tile's own, derived from its image's
  (JAX arrays in, JAX out, inside a jitted step; NumPy in, NumPy out, on the host)."""
  xp = np if isinstance(ids, np.ndarray) else jnp
  index = xp.arange(count, dtype=xp.uint32) * xp.uint32(_TILE_ID_STEP)
  repeated = xp.repeat(ids, count, axis=0)
  second = repeated[:, 1] ^ xp.tile(index, ids.shape[0])
  return xp.stack([repeated[:, 0], second], axis=1).astype(xp.uint32)


def tiles_per_pass(tiling: Tiling, local_batch: int) -> int:
  """Tiles of each image scored per pass, so that a device's pass holds at most
  `max_tiles` tiles (at least one tile of each of its images)."""
  return max(1, min(tiling.count, tiling.max_tiles // max(local_batch, 1)))


def tiled(score_fn: Callable, tiling: Tiling, per_pass: int, image_scores: Callable) -> Callable:
  """`score(state, images, ids, key) -> (maps, scores)` on `image_size` images, from a
  detector's score function on model-size images.

  `per_pass`: tiles of each image per pass (`tiles_per_pass`): the batch's images are
  scored `per_pass` tiles at a time, in sequence, which bounds the memory of a pass;
  `score_fn` must accept batches of `local_batch * per_pass` images.
  `image_scores(stitched_maps (B, S, S), tile_scores (B, n)) -> (B,)`: the detector's rule.
  """
  n = tiling.count
  passes = -(-n // per_pass)

  def score(state, images, ids, key):
    batch = images.shape[0]
    tiles = cut(images, tiling).reshape(batch, n, *(tiling.model_size,) * 2, images.shape[-1])
    ids_of_tiles = tile_ids(ids, n).reshape(batch, n, 2)
    if passes == 1:
      maps, scores = score_fn(
        state, tiles.reshape(-1, *tiles.shape[2:]), ids_of_tiles.reshape(-1, 2), key
      )
    else:
      padding = passes * per_pass - n  # Blank tiles, scored and dropped.
      tiles = jnp.pad(tiles, ((0, 0), (0, padding)) + ((0, 0),) * 3)
      ids_of_tiles = jnp.pad(ids_of_tiles, ((0, 0), (0, padding), (0, 0)))

      def one_pass(chunk):
        chunk_tiles, chunk_ids = chunk  # (B, per_pass, ...): every image's next tiles.
        return score_fn(
          state,
          chunk_tiles.reshape(-1, *chunk_tiles.shape[2:]),
          chunk_ids.reshape(-1, 2),
          key,
        )

      # The pass axis first, the batch (split over the devices) kept whole in each pass.
      by_pass = (
        jnp.moveaxis(tiles.reshape(batch, passes, per_pass, *tiles.shape[2:]), 1, 0),
        jnp.moveaxis(ids_of_tiles.reshape(batch, passes, per_pass, 2), 1, 0),
      )
      maps, scores = jax.lax.map(one_pass, by_pass)  # (passes, B * per_pass, ...)
      maps = jnp.moveaxis(maps.reshape(passes, batch, per_pass, *maps.shape[2:]), 0, 1)
      scores = jnp.moveaxis(scores.reshape(passes, batch, per_pass), 0, 1)
      maps = maps.reshape(batch, -1, *maps.shape[3:])[:, :n].reshape(-1, *maps.shape[3:])
      scores = scores.reshape(batch, -1)[:, :n]
    stitched = stitch(maps, tiling)
    tiled_scores = image_scores(stitched, scores.reshape(batch, n))
    if not tiling.with_global:
      return stitched, tiled_scores
    whole_maps, whole_scores = score_fn(state, resize_square(images, tiling.model_size), ids, key)
    whole_maps = resize_square(whole_maps, tiling.image_size)
    return (stitched + whole_maps) / 2, (tiled_scores + whole_scores) / 2

  return score


def cut_arrays(images: np.ndarray, tiling: Tiling, size: int | None = None) -> np.ndarray:
  """NumPy (N, S, S, 3) images -> their (N * n, size, size, 3) tiles (default: the
  model's size), e.g. normal images for a detector to fit on; with `with_global`, followed
  by the N whole images at that size."""
  size = size or tiling.model_size
  if len(images) == 0:
    return np.zeros((0, size, size, images.shape[-1]), np.float32)

  def views(x):
    tiles = cut(x, tiling, size)
    if tiling.with_global:
      tiles = jnp.concatenate([tiles, resize_square(x, size)])
    return tiles

  return np.asarray(jax.jit(views)(jnp.asarray(images, jnp.float32)))


def tile_normals(normals, tiling: Tiling):
  """The tiles of `normals` (`detectors.NormalImages`) as normal images: read at the
  tiling's image size, cut, and resized to whatever size the detector asks for (with
  `with_global`, the whole images too: the detector learns both views)."""

  def read(size: int):
    shots, heldout = normals.images(tiling.image_size)
    return cut_arrays(shots, tiling, size), cut_arrays(heldout, tiling, size)

  return dataclasses.replace(normals, read=read, _cache={})

"""Tiled scoring of images at their own size: the aspect ratio kept, tiles cut on the host.

With `--config.tiling.resize_short_side` set (N > 0: each image resized so that its short
side is N px; -1: each image at its own size), a tiled detector no longer squeezes images
into a square: every image is a rectangle of its own, cut here into the detector's tiles
(`tiling.tile_starts` along each side, the last tile flush with the border; an image
whose short side is below the tile is first enlarged to it). The tiles of all images of a
batch form one stream that goes to the devices in fixed passes of `max_tiles` tiles per
device (one compiled program, whatever the images' sizes; the last pass padded with blank
tiles); each image's map is stitched at its own size (mean or max over overlaps), its
score taken there by the detector's rule (`Detector.tiled_image_scores`), and the map
handed on at `image_size` x `image_size`, the size every job stores and measures maps at
(and resizes to each image's original size, as any map).

    step = tiling_native.compile_step(detector, mesh)
    maps, scores = step(replicated, [image_a, image_b], key, mesh)   # (2, S, S), (2,)

Each tile's randomness (MAEDAY's masks) comes from its image's content id and its index
(`tiling.tile_ids`), as in the square tiled path: an image read square at `image_size`
gets the same tiles, ids and maps either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np

from maeday_jax import content_ids, parallel, resizing, tiling


def image_shape(height: int, width: int, grid: tiling.Tiling) -> tuple[int, int]:
  """The (h, w) an image of (height, width) is cut at: its own, or enlarged (aspect
  kept) so that its short side holds one tile (images read with the tiling's `aspect`
  already are)."""
  return resizing.KeepAspect(-1, grid.tile_size).size(height, width)


def positions(height: int, width: int, grid: tiling.Tiling) -> tuple[tuple[int, int], ...]:
  """(top, left) of every tile of a (height, width) image, row by row."""
  rows = tiling.tile_starts(height, grid.tile_size, grid.stride)
  columns = tiling.tile_starts(width, grid.tile_size, grid.stride)
  return tuple((top, left) for top in rows for left in columns)


def cut_image(image: np.ndarray, grid: tiling.Tiling) -> np.ndarray:
  """(h, w, C) -> (n, tile, tile, C): the tiles of an image already at `image_shape`."""
  tile = grid.tile_size
  where = positions(*image.shape[:2], grid)
  return np.stack([image[y : y + tile, x : x + tile] for y, x in where])


def stitch_image(tile_maps: np.ndarray, shape: tuple[int, int], grid: tiling.Tiling) -> np.ndarray:
  """(n, tile, tile) maps of `cut_image`'s tiles -> the (h, w) map: each pixel the mean
  (or the maximum) of the tiles that cover it."""
  stitched = _Stitched(shape, grid)
  stitched.add(0, np.asarray(tile_maps, np.float32))
  return stitched.result()


class _Stitched:
  """One image's map, built tile by tile as the passes come back."""

  def __init__(self, shape: tuple[int, int], grid: tiling.Tiling):
    self.grid, self.where = grid, positions(*shape, grid)
    fill = -np.inf if grid.combine == "max" else 0.0
    self.total = np.full(shape, fill, np.float32)
    self.count = np.zeros(shape, np.int32)

  def add(self, first: int, tile_maps: np.ndarray) -> None:
    """Tile maps of tiles `first, first + 1, ...` of this image."""
    tile = self.grid.tile_size
    for i, tile_map in enumerate(tile_maps, start=first):
      y, x = self.where[i]
      window = (slice(y, y + tile), slice(x, x + tile))
      if self.grid.combine == "max":
        self.total[window] = np.maximum(self.total[window], tile_map)
      else:
        self.total[window] += tile_map
      self.count[window] += 1

  def result(self) -> np.ndarray:
    if self.grid.combine == "max":
      return self.total
    return self.total / self.count


@dataclasses.dataclass
class _Image:
  """One image of a batch on its way through the passes."""

  pixels: np.ndarray  # At `image_shape`.
  ids: np.ndarray  # (views, 2): its tiles' content ids (and the whole image's last).
  stitched: _Stitched
  tile_scores: np.ndarray
  whole: tuple[np.ndarray, float] | None = None  # 'tiles+global': the whole image's.

  @property
  def views(self) -> int:
    return len(self.ids)


@dataclasses.dataclass(frozen=True)
class NativeStep:
  """`step(replicated, images, key, mesh, valid=None) -> (maps, scores)` as NumPy: images
  a sequence of normalised float32 (h, w, C) arrays of any sizes (None: padding, scored
  as nothing: zero map and score); maps (B, S, S) at the tiling's `image_size`.

  Attributes:
    tile_step: the detector's jitted step on tiles at `tile_size` (resized to its input
      size inside, the maps back to `tile_size`), global batch `per_pass * devices`.
    grid: the detector's tiling.
    image_scores: `Detector.tiled_image_scores`.
    per_pass: tiles per device per pass.
  """

  tile_step: Callable
  grid: tiling.Tiling
  image_scores: Callable
  per_pass: int
  native = True
  transductive = False

  def __call__(self, replicated, images: Sequence[np.ndarray | None], key, mesh, valid=None):
    size = self.grid.image_size
    valid = [True] * len(images) if valid is None else [bool(v) for v in valid]
    prepared = [
      self._prepare(image) if image is not None and ok else None
      for image, ok in zip(images, valid, strict=True)
    ]
    chunk = self.per_pass * len(mesh.local_devices)  # This process's tiles per pass.
    views = [(b, v) for b, image in enumerate(prepared) if image for v in range(image.views)]
    passes = _agreed_passes(-(-len(views) // chunk))
    pending = None
    for number in range(passes):
      where = views[number * chunk : (number + 1) * chunk]
      tiles, ids = self._pass_inputs(prepared, where, chunk)
      outputs = self.tile_step(replicated, *parallel.shard_batch((tiles, ids), mesh), key)
      if pending is not None:
        self._collect(prepared, *pending, mesh)
      pending = (where, outputs)
    if pending is not None:
      self._collect(prepared, *pending, mesh)
    maps = np.zeros((len(images), size, size), np.float32)
    scores = np.zeros((len(images),), np.float32)
    for b, image in enumerate(prepared):
      if image is not None:
        maps[b], scores[b] = self._finish(image)
    return maps, scores

  def _prepare(self, image: np.ndarray) -> _Image:
    image = np.asarray(image, np.float32)
    shape = image_shape(*image.shape[:2], self.grid)
    pixels = resizing.resize_float_image(image, shape)
    ids = content_ids.image_ids([pixels])  # Its pixels as the tiles are cut from them.
    count = len(positions(*shape, self.grid))
    tile_ids = tiling.tile_ids(ids, count)
    if self.grid.with_global:
      tile_ids = np.concatenate([tile_ids, ids])
    scores = np.zeros((count,), np.float32)
    return _Image(pixels, tile_ids, _Stitched(shape, self.grid), scores)

  def _view(self, image: _Image, view: int) -> np.ndarray:
    """Tile `view` of `image` (past the last tile: the whole image at the tile size)."""
    where = image.stitched.where
    if view == len(where):
      return resizing.resize_float_image(image.pixels, self.grid.tile_size)
    y, x = where[view]
    tile = self.grid.tile_size
    return image.pixels[y : y + tile, x : x + tile]

  def _pass_inputs(self, prepared, where, chunk: int):
    tile = self.grid.tile_size
    channels = next(i.pixels.shape[-1] for i in prepared if i is not None) if where else 3
    tiles = np.zeros((chunk, tile, tile, channels), np.float32)
    ids = np.zeros((chunk, 2), np.uint32)
    for row, (b, view) in enumerate(where):
      tiles[row] = self._view(prepared[b], view)
      ids[row] = prepared[b].ids[view]
    return tiles, ids

  def _collect(self, prepared, where, outputs, mesh) -> None:
    tile_maps, tile_scores = parallel.to_local_numpy(outputs, mesh)
    for row, (b, view) in enumerate(where):
      image = prepared[b]
      if view == len(image.stitched.where):
        image.whole = (tile_maps[row], float(tile_scores[row]))
        continue
      image.stitched.add(view, tile_maps[row : row + 1])
      image.tile_scores[view] = tile_scores[row]

  def _finish(self, image: _Image) -> tuple[np.ndarray, float]:
    stitched = image.stitched.result()
    score = float(np.asarray(self.image_scores(stitched[None], image.tile_scores[None]))[0])
    if image.whole is not None:
      whole_map, whole_score = image.whole
      stitched = (stitched + resizing.resize_maps_bilinear(whole_map, stitched.shape)) / 2
      score = (score + whole_score) / 2
    return resizing.resize_maps_bilinear(stitched, self.grid.image_size), score


def _agreed_passes(local: int) -> int:
  """Passes every process runs (the most any needs): the step is a collective."""
  if jax.process_count() == 1:
    return local
  gathered = parallel.allgather_arrays({"passes": np.asarray(local, np.int64)})
  return max(int(g["passes"]) for g in gathered)


def compile_step(detector, mesh) -> NativeStep:
  """The `NativeStep` of a detector whose tiling keeps the images' aspect ratio: its own
  score function on model-size tiles, jitted data-parallel over `mesh`."""
  detector.refuse_tiling_if_transductive()
  grid = detector.tiling
  per_pass = grid.max_tiles
  inner = detector.score_function(mesh, per_pass)

  def tile_step(state, tiles, ids, key):
    maps, scores = inner(state, tiling.resize_square(tiles, grid.model_size), ids, key)
    return tiling.resize_square(maps, grid.tile_size), scores

  data, whole = parallel.batch_sharded(mesh), parallel.replicated(mesh)
  step = jax.jit(tile_step, in_shardings=(whole, data, data, whole), out_shardings=(data, data))
  return NativeStep(step, grid, detector.tiled_image_scores, per_pass)


def tiles_of(images: Iterable[np.ndarray], grid: tiling.Tiling, size: int) -> np.ndarray:
  """Images of any sizes (e.g. normal images to fit on) -> all their tiles, resized to
  `size` as the step resizes them, (N, size, size, C); with `with_global`, each image's
  whole view too (what the step scores, so the detector learns both)."""
  views = []
  for image in images:
    image = np.asarray(image, np.float32)
    image = resizing.resize_float_image(image, image_shape(*image.shape[:2], grid))
    views.extend(cut_image(image, grid))
    if grid.with_global:
      views.append(resizing.resize_float_image(image, grid.tile_size))
  if not views:
    return np.zeros((0, size, size, 3), np.float32)
  resize = jax.jit(tiling.resize_square, static_argnums=1)
  return np.concatenate(
    [np.asarray(resize(np.stack(views[i : i + 256]), size)) for i in range(0, len(views), 256)]
  )


def tile_normals(normals, grid: tiling.Tiling):
  """The tiles of `normals` (`detectors.NormalImages`), each image read with its aspect
  ratio kept, as normal images at whatever size the detector asks for (`tiles_of`)."""

  def read(size: int):
    shots, heldout = normals.native_images(grid.aspect)
    return tiles_of(shots, grid, size), tiles_of(heldout, grid, size)

  return dataclasses.replace(normals, read=read, _cache={})

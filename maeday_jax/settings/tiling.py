"""Tiled scoring (`maeday_jax.tiling`): the `tiling` section every detector reads. Light:
imports nothing but `ml_collections` (see `maeday_jax.settings`).
"""

from __future__ import annotations

import ml_collections

MODES = ("none", "tiles", "tiles+global")
COMBINES = ("mean", "max")
MAX_SHORT_SIDE = 16384


def tiling_config() -> ml_collections.ConfigDict:
  """Tiled scoring settings, part of every detector's settings (and so of its artifact).

  Fields:
    mode: 'none' (the whole image resized to the model's input size) or 'tiles' (the image
      resized to `image_size` x `image_size`, cut into overlapping tiles of `tile_size`
      that the detector scores, the maps stitched back at `image_size`) or 'tiles+global'
      (also the whole image at the input size, a second member: maps and scores are the
      mean of the tiled and the whole-image ones).
    image_size: the size images are read at when tiled (0: twice the tile size).
    tile_size: the tile side in pixels of the `image_size` image (0: the detector's input
      size); tiles of another size are resized to the input size, and their maps back.
    stride: pixels between tiles (0: half the tile size); the last tile of a row or
      column is placed against the border, so every pixel is covered.
    combine: how overlapping tiles' maps are stitched: 'mean' or 'max'.
    max_tiles: the most tiles one device scores at once; more are scored in chunks.
    resize_short_side: 0: images are read square at `image_size` (their aspect ratio not
      kept). N > 0: each image keeps its aspect ratio, resized so that its short side is N
      px; -1: each image at its own size. The tiles then cover the whole rectangle (an
      image whose short side is below the tile is enlarged to it) and are cut on the host,
      the tiles of all images of a batch scored together; maps are stitched at the image's
      size, its score taken there, and the map handed on at `image_size` x `image_size`
      (what the jobs store and measure, resized to each image's original size as any map).
  """
  return ml_collections.ConfigDict(
    dict(
      mode="none",
      image_size=0,
      tile_size=0,
      stride=0,
      combine="mean",
      max_tiles=64,
      resize_short_side=0,
    )
  )


def problems(section) -> list[tuple[str, str]]:
  """What is wrong with a `tiling` section, as (field, message) pairs (none: valid).
  Sizes that depend on the detector (the tile size 0) are checked when it is built."""
  found = []
  if section.mode not in MODES:
    found.append(("mode", f"{section.mode!r} is not one of {', '.join(MODES)}."))
  if section.combine not in COMBINES:
    found.append(("combine", f"{section.combine!r} is not one of {', '.join(COMBINES)}."))
  for field in ("image_size", "tile_size", "stride"):
    value = section[field]
    if not isinstance(value, int) or value < 0:
      found.append((field, f"must be a whole number >= 0 (0 = the default), got {value!r}."))
  short_side = section.get("resize_short_side", 0)
  if not isinstance(short_side, int) or isinstance(short_side, bool) or short_side < -1:
    found.append(
      (
        "resize_short_side",
        f"must be 0 (square images), -1 (each image at its own size) or a size in pixels, "
        f"got {short_side!r}.",
      )
    )
  elif short_side > MAX_SHORT_SIDE:  # Every image enlarged to gigapixels: surely a typo.
    found.append(
      (
        "resize_short_side",
        f"{short_side} px would enlarge every image past any camera frame; use at most "
        f"{MAX_SHORT_SIDE}, or -1 to keep each image's own size.",
      )
    )
  if not found and short_side and section.mode == "none":
    found.append(
      (
        "resize_short_side",
        "keeps images' aspect ratio for tiled scoring: set --config.tiling.mode=tiles too "
        "(whole images are read square at the model's input size).",
      )
    )
  if not isinstance(section.max_tiles, int) or section.max_tiles < 1:
    found.append(("max_tiles", f"must be a whole number >= 1, got {section.max_tiles!r}."))
  square = not section.get("resize_short_side", 0)  # Else the tiles cover each image.
  if not found and square and section.image_size and section.tile_size > section.image_size:
    found.append(
      ("tile_size", f"{section.tile_size} is larger than tiling.image_size ({section.image_size}).")
    )
  if not found and section.stride and section.tile_size and section.stride > section.tile_size:
    found.append(
      (
        "stride",
        f"{section.stride} is larger than the tile ({section.tile_size}): pixels "
        "between tiles would be left out.",
      )
    )
  return found

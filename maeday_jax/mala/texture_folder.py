"""A texture bank read from a folder of images (e.g. DTD), for `mala.textures`.

`load_texture_folder` decodes the images once on the host with Pillow; the caller puts
the result on device and draws from it with `textures.textures_from_bank`.
"""

from __future__ import annotations

import logging
import os
import pathlib

import numpy as np
from PIL import Image, ImageOps

from maeday_jax.mala import counter_rng as rng

log = logging.getLogger("maeday_jax")

# Fewer suffixes than the datasets read (`data.images.IMAGE_SUFFIXES`): the formats
# texture collections such as DTD ship in.
TEXTURE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def _read_texture(path: pathlib.Path, hw: tuple[int, int]) -> np.ndarray:
  """One texture file, centre-cropped to the aspect of `hw` and resized, uint8 RGB."""
  height, width = hw
  with Image.open(path) as opened:
    opened.load()  # decode fully now, so a truncated file fails here
    image = opened
    try:
      image = ImageOps.exif_transpose(opened)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
      image = opened
    image = image.convert("RGB")
  w, h = image.size
  if w * height > h * width:  # too wide: crop columns
    crop_w = max(1, round(h * width / height))
    left = (w - crop_w) // 2
    box = (left, 0, left + crop_w, h)
  else:  # too tall (or exact): crop rows
    crop_h = max(1, round(w * height / width))
    top = (h - crop_h) // 2
    box = (0, top, w, top + crop_h)
  # Crop first, then resize: the filter never reaches the pixels that were cropped away.
  image = image.crop(box).resize((width, height), Image.Resampling.BICUBIC)
  return np.asarray(image, dtype=np.uint8)


def texture_files(path: str | os.PathLike) -> list[pathlib.Path]:
  """The texture image files of a folder, searched recursively, sorted: .jpg, .jpeg,
  .png, .bmp in any case; hidden files and folders (e.g. macOS `._` files) left out.

  Raises:
    ValueError: naming the folder, when it does not exist or holds no image file.
  """
  folder = pathlib.Path(path).expanduser()
  if not folder.is_dir():
    raise ValueError(f"Texture folder {folder} does not exist or is not a folder.")
  files = sorted(
    p
    for p in folder.rglob("*")
    if p.suffix.lower() in TEXTURE_EXTENSIONS
    and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    and p.is_file()
  )
  if not files:
    raise ValueError(
      f"Texture folder {folder} holds no image file ({', '.join(TEXTURE_EXTENSIONS)})."
    )
  return files


def check_texture_folder(path: str | os.PathLike) -> int:
  """Checks, before any training, that a folder holds a readable texture image: lists its
  files and decodes them in order until one reads (a folder of good images costs one
  small decode). Returns the number of texture files found.

  Raises:
    ValueError: naming the folder, when it does not exist, holds no image file, or none
      of its image files can be read (the first few reasons given).
  """
  files = texture_files(path)
  reasons = []
  for file in files:
    try:
      _read_texture(file, (8, 8))
      return len(files)
    except Exception as e:  # Whatever Pillow raises for a bad file: try the next one.
      if len(reasons) < 3:
        reasons.append(f"{file.name}: {e}")
  raise ValueError(
    f"Texture folder {pathlib.Path(path).expanduser()} holds {len(files)} image files but "
    f"none can be read ({'; '.join(reasons)})."
  )


def load_texture_folder(
  path: str | os.PathLike, size: int | tuple[int, int], max_images: int | None = None
) -> np.ndarray:
  """The images of a folder (e.g. DTD) as a texture bank (N, H, W, 3) uint8.

  Searches the folder recursively for .jpg/.jpeg/.png/.bmp files (any case; hidden files
  and folders, e.g. macOS `._` files, are ignored), centre-crops each to the aspect of
  `size` (square for an int) and resizes it with Pillow (bicubic, antialiased). A file
  that cannot be read is skipped with a logged warning naming it. With `max_images`, at
  most that many are read, chosen in a fixed pseudo-random order (seed 0) so a subset of
  DTD covers all its categories; the result keeps the sorted order of the files.

  Raises:
    ValueError: naming the folder, when it does not exist, holds no image file or no
      readable one.
  """
  hw = rng.as_hw(size)
  folder = pathlib.Path(path).expanduser()
  if max_images is not None and max_images < 1:
    raise ValueError(f"max_images must be >= 1 or None, got {max_images}.")
  files = texture_files(folder)
  order = range(len(files))
  if max_images is not None and max_images < len(files):
    order = np.random.default_rng(0).permutation(len(files))
  read: dict[int, np.ndarray] = {}
  skipped = 0
  for index in order:
    try:
      read[int(index)] = _read_texture(files[index], hw)
    except Exception as e:  # one bad file (whatever Pillow raises) never fails the others
      log.warning("Skipping unreadable texture %s: %s", files[index], e)
      skipped += 1
      continue
    if max_images is not None and len(read) == max_images:
      break
  if not read:
    raise ValueError(
      f"Texture folder {folder} holds no readable image ({skipped} unreadable image "
      "files skipped; see the warnings)."
    )
  return np.stack([read[i] for i in sorted(read)])

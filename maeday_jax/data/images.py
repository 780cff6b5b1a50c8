"""Decoding image and mask files into the arrays the rest of the project uses.

Every image becomes 3-channel 8-bit RGB whatever it was stored as: grayscale is repeated
to three channels (the MAE was trained on RGB), alpha is dropped, palettes are expanded,
16-bit samples are scaled to 8 bits. Every mask becomes a 2-D uint8 array in {0, 1}:
non-zero = anomalous, the convention of MVTec AD, VisA and the magnetic-tile set.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from maeday_jax.data.errors import DataError

# File name suffixes read as images (any case): by the dataset builders (anything else in
# an image folder is reported) and by bulk scoring's folder and glob listings.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Modes whose samples are wider than 8 bits; PIL opens 16-bit PNG/TIFF as one of these.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _open(data: bytes, source: str) -> Image.Image:
  """Opens and fully decodes `data`, so truncated files fail here and not later."""
  if not data:
    raise DataError.for_file(source, "empty file")
  try:
    with warnings.catch_warnings():
      # A decompression-bomb warning is not a reason to skip; the error (2x larger) is.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      image.load()
  except Image.UnidentifiedImageError:
    raise DataError.for_file(source, "not an image file (format not recognised)") from None
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
    raise DataError.for_file(source, f"unreadable or truncated image ({e})") from None
  return image


def _wide_to_uint8(image: Image.Image) -> np.ndarray:
  """Scales 16-bit (or 32-bit integer) samples to 8 bits, rounding to nearest."""
  values = np.asarray(image).astype(np.float64)
  return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)


def _float_to_uint8(image: Image.Image) -> np.ndarray:
  """Maps float images to 8 bits, reading them as [0, 1] when they fit, else [0, 255]."""
  values = np.nan_to_num(np.asarray(image, dtype=np.float64))
  scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
  return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
  """Converts a decoded PIL image of any mode to a uint8 (h, w, 3) RGB array."""
  if image.mode in _WIDE_MODES:
    gray = _wide_to_uint8(image)
  elif image.mode == "F":
    gray = _float_to_uint8(image)
  else:
    # convert() handles 1, L, LA, P, PA, RGBA, CMYK, YCbCr, ...; alpha is dropped.
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
  return np.repeat(gray[..., None], 3, axis=-1)


def to_binary_mask(image: Image.Image) -> np.ndarray:
  """Converts a decoded mask of any mode to uint8 (h, w) in {0, 1} (non-zero = 1).

  Palette masks are read by index (index 0 is background), not by colour; for colour
  masks a pixel is anomalous when any colour channel is non-zero; alpha is ignored.
  """
  if image.mode in ("LA", "PA"):
    image = image.getchannel(0)
  elif image.mode == "RGBA":
    image = image.convert("RGB")
  values = np.asarray(image)
  if values.ndim == 3:
    values = values.any(axis=-1)
  return (values != 0).astype(np.uint8)


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
  """Decodes encoded image bytes to uint8 (h, w, 3) RGB.

  The EXIF orientation is applied, so the array looks the way image viewers show it.

  Args:
    data: the encoded file (PNG, JPEG, BMP, TIFF, ... anything Pillow reads).
    source: the path or name used in error messages.

  Raises:
    DataError: when the bytes are empty, not an image, truncated or corrupt.
  """
  image = _open(data, source)
  # A broken EXIF block must not lose an otherwise good image.
  with contextlib.suppress(Exception):
    image = ImageOps.exif_transpose(image)
  return to_rgb(image)


def decode_mask(
  data: bytes, source: str = "<bytes>", expected_hw: tuple[int, int] | None = None
) -> np.ndarray:
  """Decodes encoded mask bytes to uint8 (h, w) in {0, 1}.

  Args:
    data: the encoded mask file.
    source: the path or name used in error messages.
    expected_hw: the (height, width) of the image the mask belongs to, if known.

  Raises:
    DataError: when the mask cannot be decoded or its size differs from `expected_hw`.
  """
  mask = to_binary_mask(_open(data, source))
  if expected_hw is not None and tuple(mask.shape) != tuple(expected_hw):
    raise DataError.for_file(
      source,
      f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image is "
      f"{expected_hw[0]}x{expected_hw[1]}",
    )
  return mask


def _read_bytes(path: str | os.PathLike) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError.for_file(path, f"cannot read file ({e.strerror or e})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file as uint8 (h, w, 3) RGB; raises `DataError` naming the path."""
  return decode_image(_read_bytes(path), str(path))


def read_mask(path: str | os.PathLike, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Reads a mask file as uint8 (h, w) in {0, 1}; raises `DataError` naming the path.

  Args:
    path: the mask file.
    expected_hw: the (height, width) of its image; a different size is an error.
  """
  return decode_mask(_read_bytes(path), str(path), expected_hw)


def encode_png(array: np.ndarray) -> bytes:
  """Encodes a uint8 (h, w) or (h, w, 3) array as PNG bytes (lossless)."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()

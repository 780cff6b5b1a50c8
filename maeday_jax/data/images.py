"""Decoding image and mask files into the arrays the rest of the project uses.

Every image becomes 3-channel 8-bit RGB whatever it was stored as: grayscale is repeated
to three channels (the MAE was trained on RGB), alpha is dropped, palettes are expanded.
Every mask becomes a 2-D uint8 array in {0, 1}: non-zero = anomalous, the convention of
MVTec AD, VisA and the magnetic-tile set.

Wide grayscale samples (16-bit PNG and TIFF, 12-bit TIFF) are scaled to 8 bits by the
range of the format, never by the image's own values, so that one intensity means the
same in every image of a folder: `value * 255 / (2**bits - 1)`, rounded, where `bits` is

- the PNG `sBIT` chunk's significant bits when the file has one (a 12-bit sensor image
  saved as 16-bit PNG with sBIT 12 reads 4095 as 255). The PNG standard lets a writer
  either keep such values as they are (0..4095) or shift them up to fill 16 bits; a file
  whose samples exceed `2**bits - 1`, or are all multiples of `2**(16 - bits)` (shifted
  up), is read with the 16-bit range instead;
- the TIFF `BitsPerSample` when it is below 16 (a 12-bit TIFF);
- otherwise 16: the full 16-bit range (`value / 257`). A 12-bit image stored in a 16-bit
  file that says nothing about it stays dark (at most 4095 / 257 = 16): save it with an
  sBIT chunk of 12 (or as a 12-bit TIFF), or scale it to 16 bits, to use its range.

16-bit colour PNGs are read by Pillow with 8 bits per channel (the high byte): right for
full-range colour, and sBIT is not applied to them.

Decompression bombs: the header is read first (Pillow gives the size without decoding)
and an image (or mask) of more pixels than the per-image pixel budget is refused with a
`DataError` naming its size and the budget, before any pixel is decoded. The budget is
`set_pixel_budget(n)` (the jobs set `config.data.max_image_pixels` there), else the
environment variable `MAEDAY_MAX_IMAGE_PIXELS`, else (0 or unset) derived from memory:

    min(250 megapixels, 0.5 * memory / (decoding threads * 20 bytes))

where `memory` is the machine's physical memory, or the container's (cgroup) memory
limit when it is lower, 20 bytes is the peak a decode and resize hold per pixel, and the
decoding threads are `config.data.num_workers` (4 unless a job set it): with every
thread decoding an image of the budget at once, they hold at most half the memory. It
is the total memory, not the free memory, so that a machine refuses the same images on
every run: 16 GB and 4 threads give 100 megapixels, 40 GB or more 250. Pillow's own
decompression-bomb limit (about 179 megapixels) is raised to the budget when the budget
is larger, so that the budget is the one rule.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

from maeday_jax.data.errors import DataError, ImageTooLarge

logger = logging.getLogger(__name__)

# File name suffixes read as images (any case): by the dataset builders (anything else in
# an image folder is reported) and by bulk scoring's folder and glob listings.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# Modes whose samples are wider than 8 bits; PIL opens 16-bit PNG/TIFF as one of these.
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_BITS_PER_SAMPLE = 258


# The per-image pixel budget (see the module docstring).
PIXEL_BUDGET_ENV = "MAEDAY_MAX_IMAGE_PIXELS"
MAX_DEFAULT_PIXELS = 250_000_000
# Peak bytes one decode and resize hold per pixel: Pillow's 4-byte buffer and its
# converted copy, the uint8 array and its copy, the mask, the resize's input copy.
BYTES_PER_PIXEL = 20
# Share of the memory that every decoding thread's largest image may take together.
MEMORY_FRACTION = 0.5
DEFAULT_DECODING_THREADS = 4  # `config.data.num_workers`'s default.

_budget = {"pixels": 0, "threads": DEFAULT_DECODING_THREADS}
_warned_env: set[str] = set()


def _cgroup_limit() -> int | None:
  """The container's memory limit in bytes (cgroup v2, else v1); None when unlimited."""
  for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
    try:
      with open(path) as f:
        value = f.read().strip()
    except OSError:
      continue
    if value.isdigit() and int(value) < 1 << 60:  # v1 writes a huge number for 'no limit'.
      return int(value)
  return None


@functools.cache
def memory_bytes() -> int | None:
  """The memory a run has: physical memory, or the cgroup limit when lower; None if unknown."""
  try:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (AttributeError, ValueError, OSError):  # No sysconf (Windows) or no such name.
    physical = None
  limits = [m for m in (physical, _cgroup_limit()) if m and m > 0]
  return min(limits) if limits else None


def default_pixel_budget(threads: int = DEFAULT_DECODING_THREADS) -> int:
  """The budget derived from memory for `threads` decoding threads (module docstring)."""
  memory = memory_bytes()
  if memory is None:
    return MAX_DEFAULT_PIXELS
  share = MEMORY_FRACTION * memory / (max(1, threads) * BYTES_PER_PIXEL)
  return max(1, min(MAX_DEFAULT_PIXELS, int(share)))


def _env_budget() -> int:
  """`$MAEDAY_MAX_IMAGE_PIXELS` as a count (0 when unset, 0 or not a count)."""
  value = os.environ.get(PIXEL_BUDGET_ENV, "").strip()
  if not value:
    return 0
  try:
    pixels = int(float(value))  # '250000000' and '2.5e8' alike.
  except ValueError:
    pixels = -1
  if pixels < 0:
    # A bad setting must not skip every image: warn once, use the default.
    if value not in _warned_env:
      _warned_env.add(value)
      logger.warning(
        "%s=%r is not a pixel count; the budget derived from memory is used",
        PIXEL_BUDGET_ENV,
        value,
      )
    return 0
  return pixels


def pixel_budget() -> int:
  """The most pixels one image may have: `set_pixel_budget`'s, else
  `$MAEDAY_MAX_IMAGE_PIXELS`, else `default_pixel_budget` (see the module docstring)."""
  return _budget["pixels"] or _env_budget() or default_pixel_budget(_budget["threads"])


def set_pixel_budget(max_pixels: int = 0, threads: int | None = None) -> int:
  """Sets the per-image pixel budget of every later decode in this process.

  Args:
    max_pixels: the most pixels (width x height) an image may have; 0 = the environment
      variable `MAEDAY_MAX_IMAGE_PIXELS` if set, else the budget derived from memory.
    threads: how many threads decode at once (`config.data.num_workers`), which divides
      the memory in the derived budget; None keeps the current number (4 by default).

  Returns:
    The budget now in force.

  Raises:
    DataError: `max_pixels` is negative or `threads` below 1.
  """
  if int(max_pixels) < 0:
    raise DataError(
      f"config.data.max_image_pixels={max_pixels}: must be >= 0 (0 = derived from memory)"
    )
  if threads is not None and int(threads) < 1:
    raise DataError(f"config.data.num_workers={threads}: must be >= 1")
  _budget["pixels"] = int(max_pixels)
  if threads is not None:
    _budget["threads"] = int(threads)
  return pixel_budget()


def _lift_pillow_limit(budget: int) -> None:
  """Raises Pillow's decompression-bomb limit so that it refuses no image within `budget`
  (it errors above 2 x MAX_IMAGE_PIXELS and `_open` checks the budget on every header);
  never lowers it, so other Pillow users in the process keep at least its protection."""
  limit = Image.MAX_IMAGE_PIXELS
  if limit is not None and budget > 2 * limit:
    Image.MAX_IMAGE_PIXELS = -(-budget // 2)


def _too_large(source: str, error: Image.DecompressionBombError, budget: int) -> DataError:
  """Pillow's own refusal (an image beyond its limit, above the budget) as `ImageTooLarge`."""
  found = re.search(r"\((\d+) pixels\)", str(error))
  if found is None:  # Another wording: say what Pillow said.
    return DataError.for_file(source, f"image too large to decode ({error})")
  return ImageTooLarge(source, int(found[1]), budget)


def _open(data: bytes, source: str) -> Image.Image:
  """Opens `data`, refuses it when its header declares more pixels than the budget, and
  fully decodes it, so truncated files fail here and not later."""
  if not data:
    raise DataError.for_file(source, "empty file")
  budget = pixel_budget()
  _lift_pillow_limit(budget)
  try:
    with warnings.catch_warnings():
      # A decompression-bomb warning is not a reason to skip; the budget is.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))  # Reads the header only.
  except Image.UnidentifiedImageError:
    raise DataError.for_file(source, "not an image file (format not recognised)") from None
  except Image.DecompressionBombError as e:  # Beyond Pillow's limit, so beyond the budget.
    raise _too_large(source, e, budget) from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise DataError.for_file(source, f"unreadable or truncated image ({e})") from None
  width, height = image.size
  if width * height > budget:
    raise ImageTooLarge(source, width * height, budget, (width, height))
  try:
    image.load()
  except Image.DecompressionBombError as e:  # A frame or tile larger than the header said.
    raise _too_large(source, e, budget) from None
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise DataError.for_file(source, f"unreadable or truncated image ({e})") from None
  return image


def _png_significant_bits(data: bytes) -> int | None:
  """The first value of a PNG's sBIT chunk (grey, or red), None when it has none.

  Pillow keeps no sBIT, so the chunks before the image data are walked here.
  """
  if not data.startswith(_PNG_SIGNATURE):
    return None
  position = len(_PNG_SIGNATURE)
  while position + 8 <= len(data):
    length, kind = struct.unpack(">I4s", data[position : position + 8])
    if kind == b"sBIT" and length >= 1 and position + 9 <= len(data):
      return data[position + 8]
    if kind in (b"IDAT", b"IEND"):  # sBIT must come before the image data.
      return None
    position += 12 + length  # Length, type, data, CRC.
  return None


def sample_bits(image: Image.Image, data: bytes = b"") -> int:
  """How many bits the samples of a wide grayscale image use (see the module docstring).

  Args:
    image: the opened image (mode I;16* or I).
    data: its encoded bytes, for the PNG sBIT chunk.
  """
  bits = None
  if image.format == "PNG":
    bits = _png_significant_bits(data)
  elif image.format == "TIFF":
    per_sample = getattr(image, "tag_v2", {}).get(_TIFF_BITS_PER_SAMPLE)
    per_sample = per_sample[0] if isinstance(per_sample, tuple) else per_sample
    bits = per_sample if per_sample is not None and int(per_sample) < 16 else None
  if bits is None or not 1 <= int(bits) <= 16:
    return 16
  return int(bits)


def _wide_to_uint8(values: np.ndarray, bits: int, shifted_up: bool) -> np.ndarray:
  """Scales `bits`-bit samples to 8 bits, rounding to nearest (exactly `np.rint`).

  `shifted_up`: the PNG sBIT rule, whether samples that exceed `2**bits - 1` or are all
  multiples of `2**(16 - bits)` mean a file scaled to 16 bits (then read as 16-bit).
  """
  top = (1 << bits) - 1
  if shifted_up and bits < 16 and values.size:
    step = 1 << (16 - bits)
    peak = int(values.max())
    if peak > top or (peak > 0 and not np.any(values % step)):
      top = 0xFFFF
  # Integer arithmetic: no halfway cases exist (top is odd), so this is rint, and no
  # 8-byte float copy of a large image is made.
  clipped = np.clip(values, 0, top).astype(np.uint32)
  return ((clipped * 255 + top // 2) // top).astype(np.uint8)


def _float_to_uint8(image: Image.Image) -> np.ndarray:
  """Maps float images to 8 bits, reading them as [0, 1] when they fit, else [0, 255]."""
  values = np.nan_to_num(np.asarray(image, dtype=np.float32))
  scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
  return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image, bits: int | None = None, *, png_sbit: bool = False) -> np.ndarray:
  """Converts a decoded PIL image of any mode to a uint8 (h, w, 3) RGB array.

  Args:
    image: the decoded image.
    bits: the significant bits of a wide grayscale image (`sample_bits`); None reads
      them from the image itself (TIFF BitsPerSample), else 16.
    png_sbit: `bits` came from a PNG sBIT chunk, so the module docstring's rule for
      files shifted up to 16 bits applies.
  """
  if image.mode in _WIDE_MODES:
    bits = sample_bits(image) if bits is None else bits
    gray = _wide_to_uint8(np.asarray(image), bits, shifted_up=png_sbit)
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
    DataError: when the bytes are empty, not an image, truncated or corrupt;
      `ImageTooLarge` when the header declares more pixels than `pixel_budget()`.
  """
  image = _open(data, source)
  # Read before the EXIF transpose, whose copy keeps neither the format nor the tags.
  bits = sample_bits(image, data) if image.mode in _WIDE_MODES else None
  png_sbit = image.format == "PNG" and bits is not None and bits < 16
  # A broken EXIF block must not lose an otherwise good image.
  with contextlib.suppress(Exception):
    image = ImageOps.exif_transpose(image)
  return to_rgb(image, bits, png_sbit=png_sbit)


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

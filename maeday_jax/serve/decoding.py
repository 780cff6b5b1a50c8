"""A request's body to the detector's input, exactly as the bulk job reads a file.

The image travels as the whole body (`image/*` or `application/octet-stream`, or no
content type) or as the first file of a `multipart/form-data` body. It is decoded by
`data.images.decode_image` (the decoder behind `read_image`, which `bulk.reader` runs on
every file: EXIF orientation, wide grayscale, alpha, palettes, the per-image pixel budget
against decompression bombs) and resized and normalised by `data.preprocess_image`, so a
served score equals the bulk job's score of the same file.

Every refusal is a `BadRequest` with the HTTP status, a metrics kind and a reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np

from maeday_jax.data.errors import DataError, ImageTooLarge
from maeday_jax.data.images import decode_image
from maeday_jax.data.preprocess import preprocess_image

RAW_TYPES = ("application/octet-stream", "")
MULTIPART = "multipart/form-data"
SOURCE = "request body"  # What decoding errors call the image.


class BadRequest(Exception):
  """A request refused before scoring.

  Attributes:
    status: the HTTP status (400, 413, 415).
    kind: the `errors_total` label (`metrics`).
    reason: what is wrong, for the client.
  """

  def __init__(self, status: int, kind: str, reason: str):
    super().__init__(reason)
    self.status, self.kind, self.reason = status, kind, reason


def media_type(header: str | None) -> str:
  """The media type of a Content-Type header, lower case, without parameters."""
  return (header or "").split(";", 1)[0].strip().lower()


def check_content_type(header: str | None) -> str:
  """The media type, when the service reads it.

  Raises:
    BadRequest: 415 for any other type.
  """
  kind = media_type(header)
  if kind in RAW_TYPES or kind.startswith("image/") or kind == MULTIPART:
    return kind
  raise BadRequest(
    415,
    "unsupported_media_type",
    f"unsupported content type {kind!r}: send the image file as the body (Content-Type "
    f"image/png, image/jpeg, ... or application/octet-stream) or as a file field of "
    f"{MULTIPART}",
  )


def _too_big(max_bytes: int) -> BadRequest:
  return BadRequest(413, "body_too_large", f"body larger than the limit of {max_bytes:,} bytes")


async def read_body(
  chunks: AsyncIterator[bytes], declared_length: str | None, max_bytes: int
) -> bytes:
  """The body, read no further than `max_bytes` (a declared Content-Length beyond it is
  refused before anything is read; a chunked body as soon as it passes the limit).

  Raises:
    BadRequest: 413 over the limit, 400 for an empty body.
  """
  if declared_length is not None:
    try:
      declared = int(declared_length)
    except ValueError:
      raise BadRequest(400, "bad_request", "Content-Length is not a number") from None
    if declared > max_bytes:
      raise _too_big(max_bytes)
  parts, size = [], 0
  async for chunk in chunks:
    size += len(chunk)
    if size > max_bytes:
      raise _too_big(max_bytes)
    parts.append(chunk)
  if not size:
    raise BadRequest(400, "empty_body", "empty body: send an image file")
  return b"".join(parts)


async def multipart_file(body: bytes, headers, max_bytes: int) -> bytes:
  """The bytes of the first file part of a multipart body (already read, so bounded).

  Raises:
    BadRequest: 400 for a malformed body or one without a file part.
  """
  from starlette.datastructures import UploadFile
  from starlette.formparsers import MultiPartException, MultiPartParser

  async def stream():
    yield body
    yield b""

  parser = MultiPartParser(headers, stream(), max_files=1, max_fields=16, max_part_size=max_bytes)
  try:
    form = await parser.parse()
  except MultiPartException as e:
    raise BadRequest(400, "bad_multipart", f"malformed multipart body ({e.message})") from None
  try:
    for value in form.values():
      if isinstance(value, UploadFile):
        data = await value.read()
        if not data:
          raise BadRequest(400, "empty_body", "the multipart file part is empty")
        return data
  finally:
    await form.close()
  raise BadRequest(
    400, "bad_multipart", "multipart body without a file part (send e.g. -F image=@photo.png)"
  )


def to_input(data: bytes, size: int, aspect=None) -> np.ndarray:
  """Encoded image bytes -> the normalised float32 (size, size, 3) model input (`aspect`,
  a `resizing.KeepAspect`: its aspect ratio kept, for a detector that tiles each image at
  its own size).

  Raises:
    BadRequest: 413 for an image over the pixel budget, 400 for bytes that are not a
      readable image.
  """
  try:
    return preprocess_image(decode_image(data, SOURCE), aspect or size)
  except ImageTooLarge as e:
    raise BadRequest(413, "image_too_large", e.reason) from None
  except DataError as e:
    raise BadRequest(400, "bad_image", e.reason) from None
  except Exception as e:  # Pillow's plugins raise many types; none may kill the service.
    raise BadRequest(400, "bad_image", f"cannot decode ({type(e).__name__}: {e})") from None

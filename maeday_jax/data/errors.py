"""Errors the data layer raises for bad inputs."""

from __future__ import annotations

from maeday_jax.download import DownloadError

__all__ = ["DataError", "DownloadError", "ImageTooLarge"]


class DataError(ValueError):
  """A data file, folder or setting that cannot be used, with the path and the reason.

  Attributes:
    path: the offending file or folder, when the error is about one.
    reason: what is wrong with it.
  """

  def __init__(self, message: str, *, path: str | None = None, reason: str | None = None):
    super().__init__(message)
    self.path = path
    self.reason = reason or message

  @classmethod
  def for_file(cls, path: object, reason: str) -> DataError:
    """An error about one file: the message is '<path>: <reason>'."""
    return cls(f"{path}: {reason}", path=str(path), reason=reason)


class ImageTooLarge(DataError):
  """An image (or mask) whose header declares more pixels than the per-image budget.

  Attributes:
    pixels: width x height from the header.
    budget: the budget in force (`maeday_jax.data.images.pixel_budget`).
  """

  def __init__(
    self,
    path: object,
    pixels: int,
    budget: int,
    size: tuple[int, int] | None = None,
    what: str = "image too large to decode",
  ):
    self.pixels, self.budget = int(pixels), int(budget)
    dims = f"{size[0]}x{size[1]} = " if size else ""
    reason = (
      f"{what}: {dims}{self.pixels:,} pixels exceeds the per-image "
      f"budget of {self.budget:,} pixels (a decompression bomb, or an image larger than "
      "this machine's memory allows; raise config.data.max_image_pixels or "
      "$MAEDAY_MAX_IMAGE_PIXELS to read it)"
    )
    super().__init__(f"{path}: {reason}", path=str(path), reason=reason)

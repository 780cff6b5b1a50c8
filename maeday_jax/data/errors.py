"""Errors the data layer raises for bad inputs."""

from __future__ import annotations

from maeday_jax.download import DownloadError

__all__ = ["DataError", "DownloadError"]


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

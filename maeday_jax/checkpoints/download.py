"""Downloads of the official checkpoints: cache, integrity checks, clear offline errors.

Files are streamed to `<name>.part` next to their final place, checked, then renamed: a
file in the cache is always complete. A transfer that ends early, a size that differs from
what the server announced or the registry records, or a SHA-256 that differs from the
registry's is reported and the partial file is deleted, never used.
"""

import dataclasses
import hashlib
import http.client
import os
import pathlib
import urllib.error
import urllib.request

from tqdm.auto import tqdm

from maeday_jax.checkpoints.errors import CheckpointError

_CHUNK = 1 << 20


class DownloadError(CheckpointError):
  """A remote checkpoint could not be fetched intact."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """Where a named checkpoint lives and what it must look like when it arrives.

  Attributes:
    url: http(s) or file URL.
    sha256: expected hex digest, or None where no digest has been published.
    size: expected size in bytes, or None (the server's Content-Length is still checked).
  """

  url: str
  sha256: str | None = None
  size: int | None = None

  @property
  def filename(self) -> str:
    return self.url.rstrip("/").rsplit("/", 1)[-1]


_MAE_URL = "https://dl.fbaipublicfiles.com/mae/visualize/"

# The official pixel-target MAE checkpoints that include the decoder.
KNOWN_CHECKPOINTS: dict[str, RemoteFile] = {
  "mae_vit_base": RemoteFile(_MAE_URL + "mae_visualize_vit_base.pth"),
  "mae_vit_large": RemoteFile(_MAE_URL + "mae_visualize_vit_large.pth"),
  "mae_vit_huge": RemoteFile(_MAE_URL + "mae_visualize_vit_huge.pth"),
  "mae_vit_large_ganloss": RemoteFile(_MAE_URL + "mae_visualize_vit_large_ganloss.pth"),
}


def default_cache_dir() -> pathlib.Path:
  """`$MAEDAY_CACHE_DIR`, else `~/.cache/maeday_jax`."""
  root = os.environ.get("MAEDAY_CACHE_DIR") or os.path.join("~", ".cache", "maeday_jax")
  return pathlib.Path(root).expanduser()


def _offline_message(remote: RemoteFile, dest: pathlib.Path, reason: object) -> str:
  return (
    f"Could not download {remote.url} ({reason}). If this machine is offline, download the "
    f"file elsewhere and either pass its local path (load_mae('/path/{remote.filename}') or "
    f"--config.model.checkpoint=/path/{remote.filename}) or copy it to {dest}."
  )


def download(remote: RemoteFile, dest: pathlib.Path, progress: bool = True) -> pathlib.Path:
  """Fetches `remote` to `dest` unless an intact copy is already there.

  Raises:
    DownloadError: the URL is unreachable, or the transfer is truncated or corrupt (the
      partial file is deleted).
  """
  dest = pathlib.Path(dest)
  if dest.is_file():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + ".part")
  try:
    response = urllib.request.urlopen(remote.url, timeout=60)
  except (urllib.error.URLError, OSError, ValueError) as e:
    raise DownloadError(_offline_message(remote, dest, getattr(e, "reason", e))) from e

  digest, received = hashlib.sha256(), 0
  announced = response.headers.get("Content-Length")
  announced = int(announced) if announced and announced.isdigit() else None
  try:
    with response, open(part, "wb") as out:
      bar = tqdm(
        total=announced or remote.size,
        unit="B",
        unit_scale=True,
        desc=f"Downloading {remote.filename}",
        disable=not progress,
      )
      with bar:
        while chunk := response.read(_CHUNK):
          out.write(chunk)
          digest.update(chunk)
          received += len(chunk)
          bar.update(len(chunk))
  except (TimeoutError, http.client.IncompleteRead, ConnectionError, OSError) as e:
    part.unlink(missing_ok=True)
    raise DownloadError(
      f"The download of {remote.url} was interrupted after {received} bytes ({e}); the "
      "partial file was deleted. Try again, or download it manually: "
      + _offline_message(remote, dest, "interrupted")
    ) from e

  problems = []
  for expected, what in ((announced, "announced by the server"), (remote.size, "expected")):
    if expected is not None and received != expected:
      problems.append(f"received {received} bytes but {expected} were {what} (truncated)")
  if remote.sha256 and digest.hexdigest() != remote.sha256.lower():
    problems.append(f"SHA-256 {digest.hexdigest()} differs from the expected {remote.sha256}")
  if problems:
    part.unlink(missing_ok=True)
    raise DownloadError(
      f"The download of {remote.url} is corrupt: {'; '.join(problems)}. The file was "
      "deleted; try again."
    )
  os.replace(part, dest)
  return dest

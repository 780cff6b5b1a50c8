"""Downloads of remote files (checkpoints, dataset archives, backbone weights) into a cache.

    from maeday_jax import download
    remote = download.RemoteFile(url, sha256_prefix=download.sha256_prefix_from_name(url))
    path = download.fetch(remote, cache_dir / remote.filename, hint="Or pass a local copy.")

`fetch` streams the file to `<dest>.part` next to its final place, checks it, then renames
it (`os.replace`): a file under the final name is always complete, and one that is
already there is returned without touching the network. A `.part` file left by a run that
was stopped (Ctrl-C, a killed job) is continued on the next run with an HTTP
`Range: bytes=N-` request when the server supports it, and restarted from zero when it
does not. A transfer that ends early, a size that differs from what the server announced
or the caller expects, or a SHA-256 (or SHA-256 prefix) that differs from the expected
one is reported as a `DownloadError` and the partial file is deleted, never used.

Only the standard library (`urllib`) and tqdm are used; http(s) and file URLs work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import pathlib
import re
import urllib.error
import urllib.parse
import urllib.request

from tqdm.auto import tqdm

__all__ = ["DownloadError", "RemoteFile", "fetch", "sha256_of", "sha256_prefix_from_name"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_HEX = re.compile(r"[0-9a-f]+")
# torch.hub names hashed files `<name>-<first 8 or more hex digits of the SHA-256>.<ext>`.
_HASHED_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^-]*$")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-\d+/(\d+|\*)")


class DownloadError(ValueError):
  """A remote file could not be fetched intact; the message names the URL and what to do.

  The checkpoint and data layers raise subclasses that are also their own error types
  (`CheckpointError`, `DataError`), so a handler of either also sees its download failures.
  """


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """A file to download and what it must look like when it arrives.

  Attributes:
    url: http(s) or file URL.
    sha256: the expected hex SHA-256 of the whole file, or None where none is published.
    sha256_prefix: the expected first hex digits of the SHA-256, as torchvision writes
      them into its file names (see `sha256_prefix_from_name`), or None.
    size: the expected size in bytes, or None (the size the server announces is still
      checked).
  """

  url: str
  _: dataclasses.KW_ONLY
  sha256: str | None = None
  sha256_prefix: str | None = None
  size: int | None = None

  def __post_init__(self):
    for field, lengths in (("sha256", (64,)), ("sha256_prefix", range(1, 65))):
      value = getattr(self, field)
      if value is None:
        continue
      lowered = value.lower()
      if len(lowered) not in lengths or not _HEX.fullmatch(lowered):
        raise ValueError(f"RemoteFile({self.url!r}): {field}={value!r} is not a hex digest")
      object.__setattr__(self, field, lowered)

  @property
  def filename(self) -> str:
    """The last part of the URL's path, e.g. 'resnet18-f37072fd.pth'."""
    return urllib.parse.urlsplit(self.url).path.rstrip("/").rsplit("/", 1)[-1]


def sha256_prefix_from_name(name: str) -> str | None:
  """The SHA-256 prefix in a torch.hub-style file name or URL, or None when it has none.

  'resnet18-f37072fd.pth' -> 'f37072fd': the hex digits (8 or more) between the last '-'
  and the extension are the first digits of the file's SHA-256.
  """
  base = urllib.parse.urlsplit(name).path.rsplit("/", 1)[-1]
  match = _HASHED_NAME.search(base)
  return match.group(1) if match else None


def _hash_file(digest, path: pathlib.Path) -> None:
  with open(path, "rb") as f:
    while block := f.read(_CHUNK):
      digest.update(block)


def sha256_of(path: str | os.PathLike) -> str:
  """Returns the hex SHA-256 of a file, read in chunks (memory stays flat).

  (`maeday_jax.models.weights.sha256_of` also fingerprints a directory, such as a
  converted checkpoint.)
  """
  digest = hashlib.sha256()
  _hash_file(digest, pathlib.Path(path))
  return digest.hexdigest()


def _request(url: str, offset: int, timeout_s: float):
  headers = {"Range": f"bytes={offset}-"} if offset else {}
  return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)


def _length(response) -> int | None:
  value = response.headers.get("Content-Length")
  return int(value) if value and value.isdigit() else None


def _open(url: str, offset: int, timeout_s: float):
  """Opens `url`, continuing at byte `offset` where the server can.

  Returns `(response, offset, total)`: the offset the response's body starts at (0 when
  the server sends the whole file again) and the file's total size as announced by the
  server (None when it announces none).
  """
  if offset:
    try:
      response = _request(url, offset, timeout_s)
    except urllib.error.HTTPError as e:
      if e.code != 416:  # 416: the partial file is not a prefix the server can continue.
        raise
      e.close()
    else:
      if getattr(response, "status", None) != 206:  # The whole file (file URLs have none).
        return response, 0, _length(response)
      match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
      if match and int(match.group(1)) == offset:
        length = _length(response)
        total = match.group(2)
        total = int(total) if total.isdigit() else (offset + length if length else None)
        return response, offset, total
      response.close()  # A range other than the one asked for: start over.
  response = _request(url, 0, timeout_s)
  return response, 0, _length(response)


def _reason(e: BaseException) -> object:
  if isinstance(e, urllib.error.HTTPError):
    return f"HTTP {e.code} {e.reason}"
  return getattr(e, "reason", None) or e


def _problems(remote: RemoteFile, received: int, total: int | None, digest: str) -> list[str]:
  problems = []
  for expected, what in ((total, "announced by the server"), (remote.size, "expected")):
    if expected is not None and received != expected:
      kind = "truncated" if received < expected else "too long"
      problems.append(f"{received} bytes arrived but {expected} were {what} ({kind})")
  if remote.sha256 and digest != remote.sha256:
    problems.append(
      f"SHA-256 {digest}, not the published {remote.sha256} (the server may have sent "
      "another file, such as an error page)"
    )
  if remote.sha256_prefix and not digest.startswith(remote.sha256_prefix):
    problems.append(
      f"SHA-256 {digest} does not start with the published prefix {remote.sha256_prefix}"
    )
  return problems


def fetch(
  remote: RemoteFile,
  dest: str | os.PathLike,
  *,
  what: str | None = None,
  hint: str = "",
  progress: bool = True,
  timeout_s: float = 60.0,
) -> pathlib.Path:
  """Downloads `remote` to `dest` unless a file is already there; returns `dest`.

  Args:
    remote: the URL and the expected size and digest.
    dest: the final path; its folder is created. The transfer is written to
      `<dest>.part`, which a later call continues when the server honours HTTP ranges.
    what: a name for messages, e.g. 'MVTec AD' ('Could not download MVTec AD from URL').
    hint: what the user can do instead, e.g. how to pass a local copy; ends every error
      message.
    progress: show a tqdm progress bar.
    timeout_s: the socket timeout of each request, in seconds.

  Raises:
    DownloadError: the URL is unreachable, or the transfer is interrupted,
      truncated or corrupt (the partial file is deleted).
  """
  dest = pathlib.Path(dest)
  if dest.is_file():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + ".part")
  subject = f"{what} from {remote.url}" if what else remote.url
  hint = f" {hint}" if hint else ""
  offset = part.stat().st_size if part.is_file() else 0
  if remote.size is not None and offset > remote.size:
    offset = 0  # Longer than the whole file: not a prefix of it.
  try:
    response, offset, total = _open(remote.url, offset, timeout_s)
  except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
    if isinstance(e, urllib.error.HTTPError):
      e.close()
    raise DownloadError(f"Could not download {subject} ({_reason(e)}).{hint}") from e

  digest = hashlib.sha256()
  if offset:
    logger.info("Resuming the download of %s at byte %d", remote.url, offset)
    _hash_file(digest, part)  # The digest covers the whole file, not only the new bytes.
  else:
    logger.info("Downloading %s to %s", remote.url, dest)
  try:
    with (
      response,
      open(part, "ab" if offset else "wb") as out,
      tqdm(
        total=total or remote.size,
        initial=offset,
        unit="B",
        unit_scale=True,
        desc=f"Downloading {dest.name}",
        disable=not progress,
      ) as bar,
    ):
      while chunk := response.read(_CHUNK):
        out.write(chunk)
        digest.update(chunk)
        bar.update(len(chunk))
  except (http.client.HTTPException, OSError) as e:  # Includes timeouts and resets.
    received = part.stat().st_size if part.is_file() else 0
    part.unlink(missing_ok=True)
    raise DownloadError(
      f"The download of {subject} was interrupted after {received} bytes ({e}); the "
      f"partial file was deleted. Try again.{hint}"
    ) from e

  # The size on disk, not the bytes this call counted, so that a prefix that was not the
  # file's own (or a second writer) shows up as a size or digest mismatch.
  problems = _problems(remote, part.stat().st_size, total, digest.hexdigest())
  if problems:
    part.unlink(missing_ok=True)
    raise DownloadError(
      f"The download of {subject} is corrupt: {'; '.join(problems)}. The file was "
      f"deleted; try again.{hint}"
    )
  os.replace(part, dest)
  return dest

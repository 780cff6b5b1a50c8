"""Public dataset archives: download, SHA-256 verification, extraction, locating the root.

A raw copy given by the user (`config.data.path`, the tfds manual directory) may be the
archive itself, a folder holding it, or the folder it was extracted to. Archives, whether
downloaded or given, are verified against the published SHA-256 before use, then
extracted once under the tfds download directory; a marker next to the extraction
records what was extracted, so the multi-gigabyte archive is hashed once and not once per
category.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tarfile
from collections.abc import Callable

from maeday_jax.data.errors import DataError
from maeday_jax.download import DownloadError, RemoteFile, fetch, sha256_of

logger = logging.getLogger(__name__)

_MARKER = ".maeday_extracted.json"


@dataclasses.dataclass(frozen=True)
class Archive:
  """A published dataset archive.

  Attributes:
    title: the dataset's name for messages, e.g. 'MVTec AD'.
    url: where the archive is downloaded from.
    sha256: its published SHA-256 (hex).
    file_name: the archive's file name as published.
    homepage: where a person can fetch it by hand.
  """

  title: str
  url: str
  sha256: str
  file_name: str
  homepage: str

  def manual_instructions(self) -> str:
    """How to provide the archive by hand, for error messages and tfds."""
    return (
      f"Download {self.title} yourself ({self.url}, or from {self.homepage}), check that "
      f"its SHA-256 is {self.sha256}, and set config.data.path to the downloaded "
      f"{self.file_name} or to the folder it was extracted to (config.data.path is the "
      "tfds manual_dir)."
    )


def verify(path: pathlib.Path, archive: Archive) -> str:
  """Checks `path` against the archive's SHA-256; returns the digest or raises."""
  logger.info("Verifying the SHA-256 of %s", path)
  digest = sha256_of(path)
  if digest != archive.sha256:
    raise DownloadError(
      f"{path}: SHA-256 {digest} does not match the published {archive.title} archive "
      f"({archive.sha256}); the file is incomplete, corrupt or another file. "
      + archive.manual_instructions()
    )
  return digest


def download(archive: Archive, download_dir: pathlib.Path, timeout_s: float = 60.0) -> pathlib.Path:
  """Downloads the archive into `download_dir` (reused when already there), verified.

  The shared downloader writes `<name>.part` and renames it only once its SHA-256
  matched, so a file with the final name is always a verified one; a `.part` file left by
  a stopped run is continued where the server allows it.

  Raises:
    DownloadError: when the URL cannot be reached or the download fails its checksum.
  """
  return fetch(
    RemoteFile(archive.url, sha256=archive.sha256),
    download_dir / archive.file_name,
    what=archive.title,
    hint=archive.manual_instructions(),
    timeout_s=timeout_s,
  )


def _archive_stat(path: pathlib.Path) -> dict:
  stat = path.stat()
  return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_marker(directory: pathlib.Path) -> dict | None:
  try:
    return json.loads((directory / _MARKER).read_text())
  except (OSError, ValueError):
    return None


def extract(
  path: pathlib.Path, archive: Archive, extract_dir: pathlib.Path, verified: bool = False
) -> pathlib.Path:
  """Verifies and extracts the archive at `path` once; returns the extraction folder.

  The SHA-256 is checked unless `verified` (a download, checked as it arrived) or the
  marker shows this very file (same path, size and modification time) was already
  verified and extracted.
  """
  target = extract_dir / archive.file_name.split(".")[0]
  stat = _archive_stat(path)
  marker = _read_marker(target)
  if marker and all(marker.get(k) == v for k, v in stat.items()):
    return target
  digest = archive.sha256 if verified else verify(path, archive)
  if marker and marker.get("sha256") == digest:
    (target / _MARKER).write_text(json.dumps({**stat, "sha256": digest}))
    return target
  logger.info("Extracting %s into %s", path, target)
  partial = target.with_name(f"{target.name}.part{os.getpid()}")
  shutil.rmtree(partial, ignore_errors=True)
  partial.mkdir(parents=True)
  try:
    with tarfile.open(path) as tar:
      # The 'data' filter refuses absolute paths, links out of the folder and devices.
      tar.extractall(partial, filter="data")
  except (tarfile.TarError, OSError, EOFError) as e:
    shutil.rmtree(partial, ignore_errors=True)
    raise DataError.for_file(path, f"cannot extract the archive ({e})") from e
  (partial / _MARKER).write_text(json.dumps({**stat, "sha256": digest}))
  shutil.rmtree(target, ignore_errors=True)
  partial.replace(target)
  return target


def find_root(
  directory: pathlib.Path, is_root: Callable[[pathlib.Path], bool], max_depth: int = 2
) -> pathlib.Path | None:
  """Returns the shallowest folder at most `max_depth` below `directory` that `is_root`."""
  level = [directory]
  for _ in range(max_depth + 1):
    for candidate in level:
      if is_root(candidate):
        return candidate
    level = sorted(
      child
      for parent in level
      for child in parent.iterdir()
      if child.is_dir() and child.name[0] != "."
    )
  return None


def extracted_root(
  path: pathlib.Path, is_root: Callable[[pathlib.Path], bool], title: str, layout: str, how: str
) -> pathlib.Path:
  """The extracted dataset `title` at or at most two levels below `path` (`find_root`).

  Raises:
    DataError: `path` is a file, missing, or holds no `layout`, with `how` to get one.
  """
  if path.is_file():
    raise DataError(f"config.data.path={path} is a file. " + how)
  if not path.is_dir():
    raise DataError(f"config.data.path={path} does not exist. " + how)
  root = find_root(path, is_root)
  if root is None:
    raise DataError(f"config.data.path={path} does not hold the {title} layout ({layout}). " + how)
  return root


def locate(
  raw_path: pathlib.Path | None,
  archive: Archive,
  is_root: Callable[[pathlib.Path], bool],
  download_dir: pathlib.Path,
  extract_dir: pathlib.Path,
  layout: str,
) -> pathlib.Path:
  """Finds the dataset's root folder, downloading or extracting the archive if needed.

  Args:
    raw_path: the user's raw copy (archive, folder holding it, or extracted folder);
      None downloads the public archive.
    archive: the published archive.
    is_root: tells whether a folder is the dataset's root.
    download_dir: where downloads are kept.
    extract_dir: where archives are extracted.
    layout: a short description of the expected layout, for error messages.

  Raises:
    DataError: when `raw_path` does not exist or holds neither layout nor archive.
    DownloadError: when downloading or verifying the archive fails.
    DataError: when the archive cannot be extracted.
  """
  if raw_path is None:
    archive_path = download(archive, download_dir)
  elif raw_path.is_file():
    archive_path = raw_path
  elif raw_path.is_dir():
    if root := find_root(raw_path, is_root):
      return root
    archive_path = raw_path / archive.file_name
    if not archive_path.is_file():
      raise DataError(
        f"config.data.path={raw_path} holds neither an extracted {archive.title} copy "
        f"({layout}) nor {archive.file_name}. " + archive.manual_instructions()
      )
  else:
    raise DataError(f"config.data.path={raw_path} does not exist. " + archive.manual_instructions())
  extracted = extract(archive_path, archive, extract_dir, verified=raw_path is None)
  root = find_root(extracted, is_root)
  if root is None:
    raise DataError(
      f"{archive_path}: the archive does not contain the {archive.title} layout ({layout})"
    )
  return root

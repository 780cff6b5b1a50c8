"""Files that appear whole or not at all.

Each output is written to a temporary file beside its destination (`.<name>.tmp-<random>`),
flushed to disk, then moved onto the destination with `os.replace`, which is atomic on one
file system. A process killed half way leaves at most a stray temporary file, never a
truncated output, and an older file at the destination stays intact until the new one is
complete. Parent folders are created as needed.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
from collections.abc import Iterator

TEMPORARY_MARKER = ".tmp-"


def temporary_path(path) -> pathlib.Path:
  """A fresh temporary name in the folder of `path`: `.<name>.tmp-<random hex>`."""
  path = pathlib.Path(path)
  return path.with_name(f".{path.name}{TEMPORARY_MARKER}{secrets.token_hex(8)}")


def _fsync_file(path: pathlib.Path) -> None:
  # Opened for writing: some systems refuse to flush a file opened read-only.
  fd = os.open(path, os.O_RDWR)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_folder(folder: pathlib.Path) -> None:
  """Makes the rename itself durable where the system allows (POSIX; skipped elsewhere)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def replace_when_done(path) -> Iterator[pathlib.Path]:
  """Yields a temporary path to write; on success it replaces `path`, on failure it goes.

  The caller writes (and closes) the temporary file inside the `with` block. When the block
  ends normally the file is fsynced and moved onto `path` in one step; when it raises, the
  temporary file is deleted, `path` is left as it was, and the exception propagates.

    with replace_when_done(out) as tmp, open(tmp, "xb") as f:
      image.save(f, format="PNG")
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temporary_path(path)
  try:
    yield tmp
    _fsync_file(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise
  _fsync_folder(path.parent)


def write_bytes(path, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically (see `replace_when_done`); returns the path."""
  path = pathlib.Path(path)
  with replace_when_done(path) as tmp, open(tmp, "xb") as f:
    f.write(data)
  return path


def write_text(
  path, text: str, encoding: str = "utf-8", newline: str | None = None
) -> pathlib.Path:
  """Writes `text` to `path` atomically, like `pathlib.Path.write_text`; returns the path."""
  path = pathlib.Path(path)
  with replace_when_done(path) as tmp, open(tmp, "x", encoding=encoding, newline=newline) as f:
    f.write(text)
  return path


def remove_temporaries(folder, names=None) -> list[pathlib.Path]:
  """Deletes the temporary files `replace_when_done` left in `folder` (a process killed
  while writing): those of the destinations `names`, or all of them when None. Returns
  what was deleted.

  Only for a folder no other process is writing to now (the caller holds its lock): a
  live writer's temporary file looks the same.
  """
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return []
  removed = []
  for path in folder.iterdir():
    name = path.name
    marker = name.rfind(TEMPORARY_MARKER)
    if not name.startswith(".") or marker < 1 or not path.is_file():
      continue
    if names is None or name[1:marker] in names:
      with contextlib.suppress(FileNotFoundError):
        path.unlink()
        removed.append(path)
  return removed

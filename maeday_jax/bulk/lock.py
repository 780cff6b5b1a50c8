"""One bulk run at a time per work directory: an exclusive lock on `<workdir>/.lock`.

    with lock.hold(workdir):  # A collective: every process of the run calls it.
      ...  # read records, score, commit, merge

Process 0 takes an exclusive `fcntl.flock` on `<workdir>/.lock`, writes its host and pid
into it, and holds it until the run ends; then every process learns, in one allgather,
whether it got it, before any of them reads or writes a shard. A second run on the same
work directory (a second terminal, a job scheduled twice) therefore stops on every one
of its processes with `WorkdirLocked` (`error: --workdir ... is in use by host H, pid P`,
exit status 2) and leaves the running one alone.

The kernel releases a flock when its process dies (`kill -9`, a pre-emption), so a lock
is never left held by a dead run; the next run takes it over and logs whose it was (the
host and pid still written in the file). A run that ends normally empties the file.

Why process 0 only, and not one lock per process (`shards/process_<i>/.lock`): a work
directory holds one run, whatever its process count: the merged outputs (`scores.csv`,
`summary.json`) and `config.json` belong to the run, not to a process, and a rerun with
another process count must be refused as surely as one with the same. Process 0 of every
run takes the same lock file, and no process of a run reads or writes a shard before
process 0 holds it (the allgather), so two runs can never interleave. Per-process locks
would guard each shard folder but not the merged outputs, and two runs could each hold
some of them. This needs a file system whose `flock` is seen by every host that may run
process 0 (a local disk; NFS, where Linux maps flock to NFS locks; not a Lustre mount
with `localflock`). Where the file system cannot lock at all, the run goes on with a
warning.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import socket
from collections.abc import Iterator

import jax
import numpy as np

from maeday_jax import parallel
from maeday_jax.config_errors import ConfigError

log = logging.getLogger("maeday_jax")

LOCK_FILE = ".lock"


class WorkdirLocked(ConfigError):
  """Another run holds the work directory's lock; the message names its host and pid."""


def _read_owner(fd: int) -> dict | None:
  """The owner a lock file names ({'host', 'pid', 'started'}), or None (empty, garbled)."""
  try:
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
    owner = json.loads(text) if text.strip() else None
  except (OSError, ValueError):
    return None
  return owner if isinstance(owner, dict) else None


def _describe(owner: dict | None) -> str:
  if not owner:
    return "another process (its host and pid are not written yet)"
  started = f", started {owner['started']}" if owner.get("started") else ""
  return f"host {owner.get('host', '?')}, pid {owner.get('pid', '?')}{started}"


def _running_here(pid) -> bool:
  """Whether process `pid` exists on this host (a process of another user counts)."""
  try:
    os.kill(int(pid), 0)
  except PermissionError:
    return True
  except (OSError, ValueError, TypeError):
    return False
  return True


def acquire(path: str | os.PathLike) -> tuple[int | None, str]:
  """Takes the lock file `path` for this process: (its descriptor, '') when taken (None
  where the file system cannot lock), or (None, why not) when another process holds it."""
  path = pathlib.Path(path)
  for _ in range(3):  # The file may be replaced between open and flock (see below).
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      owner = _read_owner(fd)
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        note = ""
        here = bool(owner) and owner.get("host") == socket.gethostname()
        if here and not _running_here(owner.get("pid")):
          note = (
            " (no such process runs on this host now: a process in another container, "
            "or a lock the file server has not released yet)"
          )
        return None, (
          f"--workdir {path.parent} is in use by another bulk run: {_describe(owner)} "
          f"holds {path}{note}. Wait for it to finish or stop it; use another --workdir to "
          "run both."
        )
      log.warning(
        "Cannot lock %s (%s): this file system does not support locks; nothing stops a "
        "second run on this work directory.",
        path,
        e.strerror or e,
      )
      return None, ""
    # Locked an inode that another run may have deleted meanwhile (--overwrite): only
    # the lock on the file that is at `path` now counts.
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
      same = False
    if not same:
      os.close(fd)
      continue
    previous = _read_owner(fd)
    if previous:
      log.warning(
        "Took over the lock %s of %s, which no longer holds it: that run stopped without "
        "finishing (killed, pre-empted or crashed). This run resumes from its last commit.",
        path,
        _describe(previous),
      )
    owner = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode() + b"\n", 0)
    return fd, ""
  return None, f"--workdir {path.parent}: {path} keeps being replaced; cannot lock it."


def release(fd: int | None) -> None:
  """Empties the lock file (a normal end: the next run has no one to take over from) and
  releases it."""
  if fd is None:
    return
  with contextlib.suppress(OSError):
    os.ftruncate(fd, 0)
  os.close(fd)  # Closing the last descriptor releases the flock.


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds `<workdir>/.lock` (process 0) while the block runs. A collective.

  Raises:
    WorkdirLocked: on every process, when another run holds the lock.
  """
  fd, error = None, ""
  if jax.process_index() == 0:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    fd, error = acquire(pathlib.Path(workdir) / LOCK_FILE)
  try:
    gathered = parallel.allgather_arrays({"error": np.asarray(error)})
    errors = [str(g["error"]) for g in gathered if str(g["error"])]
    if errors:
      raise WorkdirLocked(errors[0])
    yield
  finally:
    release(fd)

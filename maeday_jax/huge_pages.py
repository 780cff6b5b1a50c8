"""Large CPU buffers on transparent huge pages: a fraction of the page faults per step.

XLA:CPU allocates a program's buffers with `malloc` at every call. glibc serves large
blocks with a fresh `mmap` and returns them with `munmap`, so every step touches gigabytes
of new 4 KiB pages, each zeroed by the kernel on its first fault: on a 2-core CPU a
third of the CPU time of a ViT-B LoRA step (2.8 of 9 CPU-seconds) was spent there.
glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) asks the kernel for
transparent huge pages (2 MiB) on those blocks, 512 times fewer faults: the step went
from 4.9 to 3.5 s, zero-shot scoring from 5.9 to 4.6 s (docs/performance.md).

Tunables are read when a process starts, so the command-line entry points call
`reexec_with_huge_pages()` first: it runs the same command again, once, with the tunable
added to `GLIBC_TUNABLES`, where it helps (Linux, glibc >= 2.35, transparent huge pages
in `madvise` mode, the common default; in `always` mode the kernel uses them anyway) and
is not set yet. `MAEDAY_KEEP_MALLOC=1` leaves the process as it is. In a notebook, start
Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment instead.
"""

from __future__ import annotations

import logging
import os
import pathlib
import platform
import sys

log = logging.getLogger("maeday_jax")

TUNABLE = "glibc.malloc.hugetlb=1"
# Set to 1 to keep malloc's settings as they are (no re-execution).
KEEP_MALLOC_ENV = "MAEDAY_KEEP_MALLOC"
THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_GLIBC_WITH_HUGETLB = (2, 35)


def _glibc_version() -> tuple[int, ...] | None:
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def _thp_mode(path: pathlib.Path) -> str | None:
  """The selected transparent-huge-page mode ('always', 'madvise', 'never'), or None."""
  try:
    text = path.read_text()
  except OSError:
    return None
  selected = [word[1:-1] for word in text.split() if word.startswith("[")]
  return selected[0] if selected else None


def wanted(environ=None, thp_mode: pathlib.Path = THP_MODE, glibc=None) -> bool:
  """Whether this process should be started again with `TUNABLE` (see the module
  docstring); `environ`, `thp_mode` and `glibc` (a version tuple) default to this
  machine's."""
  environ = os.environ if environ is None else environ
  if environ.get(KEEP_MALLOC_ENV) == "1" or "glibc.malloc.hugetlb" in environ.get(
    "GLIBC_TUNABLES", ""
  ):
    return False
  glibc = _glibc_version() if glibc is None else glibc
  return glibc is not None and glibc >= _GLIBC_WITH_HUGETLB and _thp_mode(thp_mode) == "madvise"


def environment(environ=None) -> dict[str, str]:
  """A copy of `environ` (default: this process's) with `TUNABLE` added to `GLIBC_TUNABLES`."""
  env = dict(os.environ if environ is None else environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), TUNABLE) if t)
  return env


def reexec_with_huge_pages() -> None:
  """Replaces this process by the same command with `TUNABLE` set, when `wanted()`.

  Call it first in a command-line entry point, before JAX or any thread starts: the
  process keeps its id, arguments, open files and standard streams. Returns (having
  done nothing) when the tunable is set already, unhelpful here, or refused.
  """
  if not wanted():
    return
  try:
    os.execve(sys.executable, sys.orig_argv, environment())
  except OSError as e:  # Nothing is lost: the command goes on with malloc as it was.
    log.warning("Could not restart with %s (%s); continuing without it.", TUNABLE, e)

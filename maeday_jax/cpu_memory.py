"""CPU memory that stays with the process, on huge pages: no page faults per step.

XLA:CPU allocates a program's buffers with `malloc` at every call. glibc serves large
blocks with a fresh `mmap` and returns them with `munmap`, so every step touches gigabytes
of new pages, each zeroed by the kernel on its first fault: on a 2-core CPU a third of
the CPU time of a ViT-B LoRA step (2.8 of 9 CPU-seconds). In a virtual machine that hands
freed memory back to its host (virtio-balloon free page reporting, as in Firecracker) it
is worse: after a pause of a few seconds each fault waits for the host, and a 3.5 s step
took 8 s after an 8 s pause and 11 s after 16 s (docs/performance.md).

`TUNABLES` tell glibc's malloc to take large blocks from its heap (`mmap_max=0`) and to
keep what is freed (`trim_threshold`), in one arena (`arena_max=1`: the other arenas'
heaps are bounded at 64 MiB and would map again), on transparent huge pages
(`hugetlb=1`, glibc 2.35 and later). A step then reuses the memory of the last one: no
fault at all, however long the pause. The process keeps its peak memory until it ends.

Tunables are read when a process starts, so the command-line entry points call
`reexec_with_kept_memory()` first: it runs the same command again, once, with `TUNABLES`
added to `GLIBC_TUNABLES`, on Linux with glibc 2.35 or later, unless `GLIBC_TUNABLES`
already sets any `glibc.malloc` tunable (the user's choice stands) or
`MAEDAY_KEEP_MALLOC=1`. In a notebook, start Python with `GLIBC_TUNABLES` set to
`environment()['GLIBC_TUNABLES']` instead.
"""

from __future__ import annotations

import logging
import os
import platform
import sys

log = logging.getLogger("maeday_jax")

TUNABLES = (
  "glibc.malloc.hugetlb=1",
  "glibc.malloc.mmap_max=0",
  f"glibc.malloc.trim_threshold={1 << 40}",
  f"glibc.malloc.top_pad={256 << 20}",  # The heap grows by 256 MiB at a time.
  "glibc.malloc.arena_max=1",
)
# Set to 1 to keep malloc's settings as they are (no re-execution).
KEEP_MALLOC_ENV = "MAEDAY_KEEP_MALLOC"
_GLIBC_WITH_HUGETLB = (2, 35)


def glibc_version() -> tuple[int, ...] | None:
  """This process's glibc version, None under another C library (musl, macOS)."""
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split(".")[:2])
  except ValueError:
    return None


def wanted(environ=None, glibc=None) -> bool:
  """Whether this process should be started again with `TUNABLES` (see the module
  docstring); `environ` and `glibc` (a version tuple) default to this process's."""
  environ = os.environ if environ is None else environ
  if environ.get(KEEP_MALLOC_ENV) == "1" or "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
    return False
  glibc = glibc_version() if glibc is None else glibc
  return glibc is not None and glibc >= _GLIBC_WITH_HUGETLB


def environment(environ=None) -> dict[str, str]:
  """A copy of `environ` (default: this process's) with `TUNABLES` added to
  `GLIBC_TUNABLES`."""
  env = dict(os.environ if environ is None else environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), *TUNABLES) if t)
  return env


def reexec_with_kept_memory() -> None:
  """Replaces this process by the same command with `TUNABLES` set, when `wanted()`.

  Call it first in a command-line entry point, before JAX or any thread starts: the
  process keeps its id, arguments, open files and standard streams. Returns (having
  done nothing) when the tunables are set already, unwanted here, or refused.
  """
  if not wanted():
    return
  try:
    os.execve(sys.executable, sys.orig_argv, environment())
  except OSError as e:  # Nothing is lost: the command goes on with malloc as it was.
    log.warning("Could not restart with malloc's tunables (%s); continuing without them.", e)

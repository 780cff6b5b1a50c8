"""CPU threads that match the CPU time a container may use, not the cores it can see.

XLA:CPU sizes its thread pool from the process's CPU affinity. In a container with a CPU
quota (Kubernetes `limits.cpu`, `docker --cpus`) the affinity still lists every core of
the node, so XLA starts one thread per core and the quota throttles them all: each
parallel kernel waits for its slowest, throttled thread. `fit_to_quota` narrows the
affinity to as many cores as the quota allows before JAX starts its CPU client, so XLA
sizes its pool to the CPU time the container actually has.
"""

from __future__ import annotations

import logging
import math
import os
import pathlib

log = logging.getLogger("maeday_jax")

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
# Set to 1 to keep the affinity as it is (e.g. when a launcher pins processes itself).
KEEP_AFFINITY_ENV = "MAEDAY_KEEP_CPU_AFFINITY"


def cgroup_cpu_quota(root: pathlib.Path = CGROUP_ROOT) -> float | None:
  """CPUs' worth of time the cgroup may use (quota / period), None when unlimited.

  Reads cgroup v2 (`cpu.max`: "<quota> <period>" or "max <period>") or v1
  (`cpu/cpu.cfs_quota_us`, -1 = unlimited, and `cpu/cpu.cfs_period_us`).
  """
  root = pathlib.Path(root)
  try:
    quota, period = (root / "cpu.max").read_text().split()[:2]
    return None if quota == "max" else int(quota) / int(period)
  except (OSError, ValueError):
    pass
  try:
    quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
    period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 else quota / period
  except (OSError, ValueError):
    return None


def usable_cpus(root: pathlib.Path = CGROUP_ROOT) -> int:
  """The cores this process should keep busy: min(affinity, ceil(cgroup quota))."""
  visible = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  quota = cgroup_cpu_quota(root)
  return visible if quota is None else max(1, min(visible, math.ceil(quota)))


def fit_to_quota(root: pathlib.Path = CGROUP_ROOT) -> int | None:
  """Narrows the CPU affinity to `usable_cpus` when a quota is below the visible cores.

  Call it before the first JAX computation (XLA reads the affinity once, when its CPU
  client starts). Returns the new number of cores, or None when nothing changed.
  """
  if os.environ.get(KEEP_AFFINITY_ENV) == "1" or not hasattr(os, "sched_setaffinity"):
    return None
  cores = sorted(os.sched_getaffinity(0))
  wanted = usable_cpus(root)
  if wanted >= len(cores):
    return None
  os.sched_setaffinity(0, cores[:wanted])
  log.info(
    "CPU quota of %.2f cores: using %d of the %d visible cores (set %s=1 to keep all).",
    cgroup_cpu_quota(root),
    wanted,
    len(cores),
    KEEP_AFFINITY_ENV,
  )
  return wanted

"""The bulk job's progress line: one per host.

On one host the line covers the whole run; on several, each host shows its own shard
("host 2/4"), since a host only knows what it scored itself. The line gives images done /
total, images/s and the time left (tqdm). In a terminal it is redrawn in place; written to a
log file (pods, batch schedulers) it is refreshed at most every `LOG_INTERVAL_S` seconds,
so that logs stay readable.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def host_progress(
  total: int, done: int, host: int, hosts: int, show: bool = True, file=None
) -> tqdm:
  """A progress bar for this host's `total` images, `done` of which a previous run scored.

  Args:
    total: the images of this host's shard.
    done: those already committed (a resumed run starts from them; its rate counts only
      what this run scores).
    host, hosts: this process's index and the process count.
    show: False to draw nothing.
    file: where to draw (default: standard error).
  """
  file = sys.stderr if file is None else file
  interactive = hasattr(file, "isatty") and file.isatty()
  return tqdm(
    total=total,
    initial=min(done, total),
    desc="scoring" if hosts == 1 else f"scoring (host {host + 1}/{hosts})",
    unit="img",
    file=file,
    dynamic_ncols=interactive,
    mininterval=0.5 if interactive else LOG_INTERVAL_S,
    ascii=not interactive,
    disable=not show,
  )

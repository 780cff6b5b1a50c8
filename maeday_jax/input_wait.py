"""How long a scoring loop waited for its input pipeline, and when to say so.

The loaders (`bulk.reader`, `data.batches`) decode and resize in worker threads ahead of
the device; the loop that consumes their batches should never wait for one. The time it
does wait is measured where it waits, and a loop that waited too long says so:

    with input_wait.watched(reader.read_batches(...), num_workers) as batches:
      for batch in batches:
        ...
    batches.waited   # seconds

Where the loop overlaps a batch's device work with its wait for the next one (the bulk
job), that wait is an upper bound of the device's idle time: a loop that waits at all is
paced by its input, and the device was idle for at most that long.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

log = logging.getLogger("maeday_jax")
T = TypeVar("T")

# Above this share of the scoring time spent waiting for input, a run says that the
# input pipeline, not the model, set its pace.
INPUT_BOUND_SHARE = 0.25


class TimedIterator(Iterator[T]):
  """Iterates `items`; `waited` sums the seconds spent inside their `next` (the last,
  exhausted call included)."""

  def __init__(self, items: Iterable[T]):
    self._items = iter(items)
    self.waited = 0.0

  def __next__(self) -> T:
    start = time.perf_counter()
    try:
      return next(self._items)
    finally:
      self.waited += time.perf_counter() - start

  def close(self) -> None:
    """Closes the source (a generator: its pipeline shuts down now, even when the loop
    stopped on an error and a traceback still holds this iterator)."""
    close = getattr(self._items, "close", None)
    if close is not None:
      close()


@contextlib.contextmanager
def watched(items: Iterable[T], num_workers: int, where: str = "") -> Iterator[TimedIterator[T]]:
  """`items` as a `TimedIterator`, closed however the block ends (a generator's pipeline
  shuts down with it); a block that ends normally having waited for more than
  `INPUT_BOUND_SHARE` of its time logs `input_bound_warning` (after `where: `)."""
  batches = TimedIterator(items)
  start = time.perf_counter()
  try:
    yield batches
  finally:
    batches.close()
  message = input_bound_warning(batches.waited, time.perf_counter() - start, num_workers)
  if message:
    log.warning("%s%s", f"{where}: " if where else "", message)


def share(waited: float, seconds: float) -> float | None:
  """`waited` over `seconds`, rounded to 4 places; None without any time."""
  return round(waited / seconds, 4) if seconds > 0 else None


def slowest_share(runs: Sequence[tuple[float, float]]) -> float | None:
  """The share (`share`) of the run, of (waited, seconds) pairs, that took longest: the
  one that set the pace of them all (processes of one job)."""
  if not runs:
    return None
  waited, seconds = max(runs, key=lambda run: run[1])
  return share(waited, seconds)


def input_bound_warning(waited: float, seconds: float, num_workers: int) -> str | None:
  """What to say when the input pipeline held the device up for more than
  `INPUT_BOUND_SHARE` of a run's `seconds` (None otherwise)."""
  if seconds <= 0 or waited / seconds <= INPUT_BOUND_SHARE:
    return None
  return (
    f"The input pipeline set this run's pace: scoring waited for decoded images "
    f"{100 * waited / seconds:.0f} % of the time ({waited:.1f} of {seconds:.1f} s). "
    f"Raise --config.data.num_workers (now {num_workers}) where CPU cores are free, or read "
    f"the images from faster storage."
  )

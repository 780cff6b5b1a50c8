"""How long a scoring loop waited for its input pipeline, and when to say so.

The loaders (`bulk.reader`, `data.batches`) decode and resize in worker threads ahead of
the device; the loop that consumes their batches should never wait for one. The time it
does wait is measured where it waits:

    batches = input_wait.TimedIterator(reader.read_batches(...))
    for batch in batches:
      ...
    message = input_wait.input_bound_warning(batches.waited, seconds, num_workers)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

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


def input_bound_warning(waited: float, seconds: float, num_workers: int) -> str | None:
  """What to say when the input pipeline held the device up for more than
  `INPUT_BOUND_SHARE` of a run's `seconds` (None otherwise)."""
  if seconds <= 0 or waited / seconds <= INPUT_BOUND_SHARE:
    return None
  return (
    f"The input pipeline set this run's pace: the device waited for images "
    f"{100 * waited / seconds:.0f} % of the scoring time ({waited:.1f} of {seconds:.1f} s). "
    f"Raise --config.data.num_workers (now {num_workers}) where CPU cores are free, or read "
    f"the images from faster storage."
  )

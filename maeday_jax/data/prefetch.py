"""Loading batches on a thread pool, a bounded number of batches ahead of the consumer.

Shared by the dataset pipeline (`data.pipeline.batches`) and bulk scoring
(`bulk.reader.read_batches`): while batch b is consumed, `num_workers` threads load the
items of batches b + 1 ... b + prefetch, so at most `(prefetch + 1)` batches of items are
in memory, however many batches there are.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

Batch = TypeVar("Batch")


def prefetched(
  batches: Sequence[int],
  tasks: Callable[[int], Sequence[Callable[[], Any] | None]],
  assemble: Callable[[int, list[concurrent.futures.Future | None]], Batch],
  *,
  num_workers: int,
  prefetch: int,
  thread_name_prefix: str,
) -> Iterator[Batch]:
  """Yields `assemble(b, futures)` for each batch number b of `batches`, in order.

  `tasks(b)` lists the zero-argument loaders of batch b's items (None for a row with
  nothing to load: its future is None too); they run on a pool of `num_workers` (at least
  1) threads, submitted up to `prefetch` batches ahead of the one being assembled.
  `assemble` reads the futures' results (an item's error is raised by its `result()`,
  for `assemble` to handle). Stopping early (the consumer breaks, or an exception)
  cancels what has not started and waits for the running loads: no thread keeps
  decoding after the generator is closed. Callers that wrap this in their own generator
  should `yield from` it, so that closing theirs closes this one at once.
  """
  pool = concurrent.futures.ThreadPoolExecutor(
    max(1, num_workers), thread_name_prefix=thread_name_prefix
  )
  pending: collections.deque = collections.deque()
  try:
    submitted = 0
    for position, batch in enumerate(batches):
      while submitted < min(len(batches), position + 1 + max(0, prefetch)):
        loaders = tasks(batches[submitted])
        pending.append([None if task is None else pool.submit(task) for task in loaders])
        submitted += 1
      yield assemble(batch, pending.popleft())
  finally:
    pool.shutdown(wait=True, cancel_futures=True)

"""Dynamic batching: requests that arrive together share one call of the compiled step.

One task on the event loop takes the first waiting image, then more until `max_batch`
images or `max_wait` seconds have passed, and runs the model on them in its own worker
thread (so the loop keeps answering /healthz, /metrics and refusals meanwhile). While a
batch runs, the next requests wait in the queue, so under load batches fill without
waiting. Each request gets its own row back through its future, exactly once.

Admission is bounded: at most `capacity` requests (the queue plus one batch in the model)
are held, counted from the moment a request is admitted, before its body is read, so the
bodies and decodes held in memory are bounded too; beyond it `admit` returns False and
the caller answers 503 with `retry_after()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class _Item:
  image: np.ndarray
  future: asyncio.Future
  queued: float  # perf_counter when it entered the queue


@dataclasses.dataclass(frozen=True)
class Result:
  """One image's map and score, and how long it waited and was scored."""

  map: np.ndarray
  score: float
  queue_seconds: float
  model_seconds: float
  batch_size: int


class Batcher:
  """Groups images into batches for `score(images) -> (maps, scores)`.

  Args:
    score: the model (`ServedModel.score`), called in a worker thread.
    max_batch: the most images per call.
    max_wait: seconds the first image of a batch waits for others.
    queue_size: requests that may wait beyond the batch being scored.
    on_batch: `on_batch(size, seconds)` after each call (metrics).
  """

  def __init__(
    self,
    score: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    *,
    max_batch: int,
    max_wait: float,
    queue_size: int,
    on_batch: Callable[[int, float], None] | None = None,
  ):
    if max_batch < 1 or queue_size < 0 or max_wait < 0:
      raise ValueError("max_batch must be >= 1, queue_size and max_wait >= 0")
    self._score, self.max_batch, self.max_wait = score, max_batch, max_wait
    self.capacity = queue_size + max_batch
    self._on_batch = on_batch
    self.pending = 0  # Admitted and not yet released.
    self._queue: asyncio.Queue[_Item] | None = None
    self._task: asyncio.Task | None = None
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="serve-model")
    self._batch_seconds = 0.0  # Recent model time per batch, for Retry-After.

  def start(self) -> None:
    """Starts the batching task on the running event loop."""
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._run(), name="serve-batcher")

  async def stop(self) -> None:
    """Stops batching; waiting requests fail with `CancelledError`."""
    if self._task is not None:
      self._task.cancel()
      await asyncio.gather(self._task, return_exceptions=True)
    while self._queue is not None and not self._queue.empty():
      item = self._queue.get_nowait()
      if not item.future.done():
        item.future.cancel()
    self._executor.shutdown(wait=False, cancel_futures=True)

  @property
  def alive(self) -> bool:
    """Whether the batching task is running (healthy)."""
    return self._task is not None and not self._task.done()

  def admit(self) -> bool:
    """Takes a place for one request, or False when `capacity` are already held."""
    if self.pending >= self.capacity:
      return False
    self.pending += 1
    return True

  def release(self) -> None:
    """Gives back the place `admit` took (once the request is answered)."""
    self.pending -= 1

  def retry_after(self) -> int:
    """Seconds a refused client should wait: the time to score what is held, at least 1."""
    batches = math.ceil(self.capacity / self.max_batch)
    return max(1, math.ceil(batches * (self._batch_seconds + self.max_wait)))

  async def score(self, image: np.ndarray) -> Result:
    """The map and score of one admitted image, once its batch has run."""
    future = asyncio.get_running_loop().create_future()
    self._queue.put_nowait(_Item(image, future, time.perf_counter()))
    return await future

  async def _next_batch(self) -> list[_Item]:
    items = [await self._queue.get()]
    try:
      async with asyncio.timeout(self.max_wait):
        while len(items) < self.max_batch:
          items.append(await self._queue.get())
    except TimeoutError:
      pass
    while len(items) < self.max_batch and not self._queue.empty():
      items.append(self._queue.get_nowait())  # Arrived as the wait ended.
    return [item for item in items if not item.future.done()]  # Not given up by the client.

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      items = await self._next_batch()
      if not items:
        continue
      started = time.perf_counter()
      try:
        images = [item.image for item in items]  # Stacked by the model (or not: native).
        maps, scores = await loop.run_in_executor(self._executor, self._score, images)
      except Exception as e:  # A failed batch fails its requests, never the service.
        for item in items:
          if not item.future.done():
            item.future.set_exception(e)
        continue
      seconds = time.perf_counter() - started
      recent = self._batch_seconds
      self._batch_seconds = 0.8 * recent + 0.2 * seconds if recent else seconds
      if self._on_batch is not None:
        self._on_batch(len(items), seconds)
      for row, item in enumerate(items):
        if not item.future.done():
          waited = started - item.queued
          item.future.set_result(Result(maps[row], float(scores[row]), waited, seconds, len(items)))

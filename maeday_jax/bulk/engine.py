"""Scoring a listing on every process, committing as it goes, resuming where it stopped.

    listing = source.list_source("/photos")
    summary = engine.score_listing(listing, workdir, make_scoring=build, batch_size=64)

Every process scores its own shard (`Listing.shard`) in batches of `batch_size //
process_count` images, and every process runs the same number of global batches (a
shorter shard's last batches are padding), so the compiled step's collectives line up.

On disk, under the work directory:

  shards/process_<i>/part_<n>.csv   the rows (index, file, score[, label]) of the n-th commit
  shards/process_<i>/progress.json  what is committed: next batch and position in the shard,
                                    parts written, images scored, skipped files (path and
                                    reason), scoring seconds, the listing's fingerprint and
                                    the process count
  scores.csv                        file, score[, label]: every scored image, sorted by file
  summary.json                      images, skipped with reasons, images/s per process,
                                    wall time

All processes commit at the same global batch counts (every `commit_every` batches and at
the end): the part is written under a temporary name, fsynced and renamed, and only then
the progress record (the same way), so a record never counts a part that is not whole. On
start each process reads its record; part files beyond it (a kill between the part and the
record) are deleted. The processes resume together from the smallest recorded batch; a
process that had committed further re-scores those batches without writing their rows
again, so every image is written exactly once. A finished run does no work on a rerun
(not even loading the model). A record of another process count or another file list is
refused with a `ConfigError` saying what changed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from maeday_jax import atomic_files, parallel, zero_shot
from maeday_jax.bulk import reader
from maeday_jax.bulk.source import Fingerprint, Listing
from maeday_jax.config_errors import ConfigError
from maeday_jax.data.pipeline import batches_per_shard
from maeday_jax.reports import spreadsheet_safe

log = logging.getLogger("maeday_jax")

SHARDS_FOLDER = "shards"
PROGRESS_FILE = "progress.json"
SCORES_FILE = "scores.csv"
SUMMARY_FILE = "summary.json"
PART_COLUMNS = ("index", "file", "score", "label")


def part_name(number: int) -> str:
  return f"part_{number}.csv"


@dataclasses.dataclass
class Progress:
  """One process's committed state (`progress.json`)."""

  process_index: int
  process_count: int
  fingerprint: dict
  batch_size: int  # This process's batch.
  num_batches: int  # Global batches every process runs.
  next_batch: int = 0
  next_position: int = 0  # In the shard: positions before it are scored or skipped.
  parts: int = 0
  images: int = 0
  seconds: float = 0.0
  skipped: list = dataclasses.field(default_factory=list)  # [{"file", "path", "reason"}]

  @property
  def done(self) -> bool:
    return self.next_batch >= self.num_batches

  @classmethod
  def from_dict(cls, payload: dict) -> Progress:
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in payload.items() if k in fields})

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "done": self.done}


class ShardStore:
  """The files of one process under `<workdir>/shards/process_<index>/`."""

  def __init__(self, workdir: str | os.PathLike, index: int):
    self.folder = pathlib.Path(workdir) / SHARDS_FOLDER / f"process_{index}"

  @property
  def progress_path(self) -> pathlib.Path:
    return self.folder / PROGRESS_FILE

  def read(self) -> Progress | None:
    if not self.progress_path.is_file():
      return None
    return Progress.from_dict(json.loads(self.progress_path.read_text()))

  def write(self, progress: Progress) -> None:
    atomic_files.write_text(
      self.progress_path, json.dumps(progress.to_dict(), indent=1, sort_keys=True)
    )

  def write_part(self, number: int, rows: list[tuple]) -> None:
    with (
      atomic_files.replace_when_done(self.folder / part_name(number)) as tmp,
      open(tmp, "x", newline="", encoding="utf-8") as f,
    ):
      writer = csv.writer(f)
      writer.writerow(PART_COLUMNS)
      writer.writerows(rows)
      f.flush()

  def remove_uncommitted(self, parts: int) -> None:
    """Deletes part files the record does not count, and stray temporary files."""
    if not self.folder.is_dir():
      return
    for path in self.folder.iterdir():
      name = path.name
      stale_part = name.startswith("part_") and name.endswith(".csv")
      if stale_part:
        try:
          stale_part = int(name[len("part_") : -len(".csv")]) >= parts
        except ValueError:
          stale_part = False
      if stale_part or atomic_files.TEMPORARY_MARKER in name:
        path.unlink(missing_ok=True)

  def rows(self, progress: Progress) -> Iterator[dict]:
    """The committed rows, in commit order."""
    for number in range(progress.parts):
      with open(self.folder / part_name(number), newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def _mismatch(progress: Progress, listing: Listing, process_count: int, batch_size: int) -> str:
  """Why a recorded progress cannot be resumed by this run ('' when it can)."""
  if progress.process_count != process_count:
    return (
      f"this work directory was scored by {progress.process_count} process(es), this run "
      f"has {process_count}: shards depend on the process count. Rerun with "
      f"{progress.process_count} process(es), or use a new --workdir."
    )
  old = Fingerprint.from_dict(progress.fingerprint)
  if old != listing.fingerprint:
    change = listing.fingerprint.count - old.count
    counted = (
      f"{abs(change)} {'more' if change > 0 else 'fewer'}"
      if change
      else "the same number of files, but different ones"
    )
    return (
      f"the file list of --config.data.path={listing.source} changed since this run began: "
      f"it had {old.describe()}, it now has {listing.fingerprint.describe()} ({counted}). "
      "Use a new --workdir (or --overwrite) to score the new list."
    )
  if progress.batch_size != batch_size:
    return (
      f"this work directory was scored in batches of {progress.batch_size} per process, "
      f"this run uses {batch_size}; use the same --config.batch_size or a new --workdir."
    )
  return ""


def _agree(store: ShardStore, progress: Progress | None, new: Progress, listing: Listing) -> int:
  """Checks every process's record; returns the batch all processes resume from."""
  error = (
    "" if progress is None else _mismatch(progress, listing, new.process_count, new.batch_size)
  )
  record = progress or new
  gathered = parallel.allgather_arrays(
    {
      "error": np.asarray(error),
      "next_batch": np.asarray(record.next_batch if not error else 0, np.int64),
      "sha256": np.asarray(listing.fingerprint.sha256),
    }
  )
  errors = sorted({str(g["error"]) for g in gathered if str(g["error"])})
  if errors:
    raise ConfigError("; ".join(errors))
  if len({str(g["sha256"]) for g in gathered}) > 1:
    raise ConfigError(
      f"--config.data.path={listing.source}: the processes list different files (the "
      "hosts see different folders or manifests); every host must see the same list."
    )
  return min(int(g["next_batch"]) for g in gathered)


def score_listing(
  listing: Listing,
  workdir: str | os.PathLike,
  *,
  make_scoring: Callable[[], object],
  batch_size: int,
  commit_every: int = 50,
  progress: bool = True,
) -> dict:
  """Scores this process's shard of `listing`, then (process 0) writes the merged outputs.

  A collective: every process calls it with the same listing and settings.

  Args:
    listing: what to score (`source.list_source`), the same on every process.
    workdir: the run's work directory.
    make_scoring: builds the `evaluation.Scoring` (called only when work remains).
    batch_size: the global batch (images), a multiple of the device count.
    commit_every: commit every this many global batches (and at the end).
    progress: show a progress bar on process 0.

  Returns:
    The summary (`summary.json`) on every process.
  """
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  index, count = jax.process_index(), jax.process_count()
  if batch_size % count:
    raise ConfigError(f"--config.batch_size: {batch_size} does not split over {count} processes.")
  local_batch = batch_size // count
  shard = listing.shard(index, count)
  total_batches = batches_per_shard(len(listing), local_batch, count)
  store = ShardStore(workdir, index)
  fresh = Progress(
    process_index=index,
    process_count=count,
    fingerprint=listing.fingerprint.to_dict(),
    batch_size=local_batch,
    num_batches=total_batches,
  )
  recorded = store.read()
  start = _agree(store, recorded, fresh, listing)
  record = recorded or fresh
  store.remove_uncommitted(record.parts)
  if recorded is None:
    store.write(record)
  if start < total_batches:
    _score(listing, shard, store, record, start, make_scoring(), commit_every, progress)
  else:
    log.info("Every image of %s is already scored; nothing to do.", listing.source)
  parallel.barrier("maeday_jax: bulk scoring done")
  if index == 0:
    merge(workdir, listing, count, wall_seconds=time.perf_counter() - started)
  parallel.barrier("maeday_jax: bulk scores merged")
  return json.loads((workdir / SUMMARY_FILE).read_text())


def _score(listing, shard, store: ShardStore, record: Progress, start, scoring, commit_every, show):
  """Runs global batches `start, ...` of this shard, committing this process's new rows."""
  total = record.num_batches
  count = record.process_count
  paths = listing.paths[shard.start : shard.stop]
  own_from = record.next_batch  # Batches before it are already committed here.
  rows: list[tuple] = []
  skipped: list[dict] = []
  scored = 0
  last = time.perf_counter()
  bar = tqdm(
    total=len(listing),
    initial=min(len(listing), start * record.batch_size * count),
    desc="scoring",
    unit="img",
    dynamic_ncols=True,
    disable=not show or jax.process_index() != 0,
  )

  def finish(batch: reader.Batch, device_scores) -> None:
    nonlocal scored, last
    scores = parallel.to_local_numpy(device_scores, scoring.mesh)
    if batch.index >= own_from:
      for row in np.flatnonzero(batch.valid):
        i = shard.start + int(batch.positions[row])
        label = "" if listing.labels is None else listing.labels[i]
        rows.append((i, listing.files[i], repr(float(scores[row])), label))
      scored += int(batch.valid.sum())
      for position, path, reason in batch.skipped:
        name = listing.files[shard.start + position]
        log.warning("Skipped %s: %s", name, reason)
        skipped.append({"file": name, "path": path, "reason": reason})
    bar.update(batch.covered * count)
    done = batch.index + 1
    if (done % commit_every == 0 or done == total) and done > record.next_batch:
      if rows:
        store.write_part(record.parts, rows)
        record.parts += 1
      now = time.perf_counter()
      record.next_batch = done
      record.next_position = min(len(shard), done * record.batch_size)
      record.images += scored
      record.seconds += now - last
      record.skipped.extend(skipped)
      store.write(record)  # After the part: the record never counts a missing part.
      rows.clear()
      skipped.clear()
      scored, last = 0, now

  pending = None
  with bar:
    for batch in reader.read_batches(
      paths,
      record.batch_size,
      scoring.image_size,
      first_batch=start,
      stop_batch=total,
      num_workers=scoring.num_workers,
      prefetch=scoring.prefetch,
    ):
      ids = zero_shot.image_ids(batch.images)
      images, ids = parallel.shard_batch((batch.images, ids), scoring.mesh)
      if scoring.resize_fn is not None:
        images = scoring.resize_fn(images)
      _, device_scores = scoring.score_fn(scoring.replicated, images, ids, scoring.key)
      # The device works on this batch while the previous one is committed.
      if pending is not None:
        finish(*pending)
      pending = (batch, device_scores)
    if pending is not None:
      finish(*pending)


def merge(workdir: str | os.PathLike, listing: Listing, process_count: int, wall_seconds=0.0):
  """Writes `scores.csv` and `summary.json` from every process's committed parts.

  Rows are streamed in listing order (shards are contiguous and sorted), so memory does
  not grow with the number of images.

  Raises:
    RuntimeError: the parts do not account for every listed image exactly once.
  """
  workdir = pathlib.Path(workdir)
  with_label = listing.labels is not None
  records = []
  images, previous = 0, -1
  with (
    atomic_files.replace_when_done(workdir / SCORES_FILE) as tmp,
    open(tmp, "x", newline="", encoding="utf-8") as f,
  ):
    writer = csv.writer(f)
    writer.writerow(["file", "score", *(["label"] if with_label else [])])
    for index in range(process_count):
      store = ShardStore(workdir, index)
      record = store.read()
      if record is None or not record.done:
        raise RuntimeError(f"{store.folder}: the shard of process {index} is not finished.")
      records.append(record)
      for row in store.rows(record):
        position = int(row["index"])
        if position <= previous:
          raise RuntimeError(f"{store.folder}: row {row['file']!r} is out of order or repeated.")
        previous = position
        cells = [spreadsheet_safe(row["file"]), row["score"]]
        writer.writerow(cells + ([row["label"]] if with_label else []))
        images += 1
  skipped = [{"file": name, "reason": reason} for name, reason in listing.skipped]
  skipped += [{"file": s["file"], "reason": s["reason"]} for r in records for s in r.skipped]
  unreadable = sum(len(r.skipped) for r in records)
  if images + unreadable != len(listing):
    raise RuntimeError(
      f"{workdir}: {images} scored and {unreadable} skipped images, but {len(listing)} listed."
    )
  summary = {
    "source": listing.source,
    "kind": listing.kind,
    "listed": len(listing),
    "fingerprint": listing.fingerprint.to_dict(),
    "duplicates": listing.duplicates,
    "images": images,
    "skipped_count": len(skipped),
    "skipped": skipped,
    "processes": [
      {
        "process": r.process_index,
        "images": r.images,
        "seconds": round(r.seconds, 3),
        "images_per_second": round(r.images / r.seconds, 3) if r.seconds > 0 else None,
      }
      for r in records
    ],
    "wall_seconds": round(wall_seconds, 3),
    "scores": str(workdir / SCORES_FILE),
  }
  atomic_files.write_text(
    workdir / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True, default=str)
  )
  rates = [p["images_per_second"] for p in summary["processes"] if p["images_per_second"]]
  log.info(
    "Scored %d of %d images (%d skipped) on %d process(es), %.1f images/s per process, "
    "in %.1f s: %s",
    images,
    len(listing),
    len(skipped),
    process_count,
    float(np.mean(rates)) if rates else 0.0,
    wall_seconds,
    workdir / SCORES_FILE,
  )
  return summary

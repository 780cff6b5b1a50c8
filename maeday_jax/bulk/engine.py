"""Scoring a listing on every process, committing as it goes, resuming where it stopped.

    listing = source.list_source("/photos")
    summary = engine.score_listing(listing, workdir, make_scoring=build, batch_size=64)

Every process scores its own shard (`Listing.shard`) in batches of `batch_size //
process_count` images, and every process runs the same number of global batches (a
shorter shard's last batches are padding), so the compiled step's collectives line up.

On disk, under the work directory:

  .lock                             held by the running run's process 0 (`lock`)
  shards/process_<i>/part_<n>.csv   the rows (index, file, score, label, and the input's
                                    path, size and mtime) of the n-th commit
  shards/process_<i>/maps_<n>.npz   with `maps`: those rows' anomaly maps (`maps_store`)
  shards/process_<i>/progress.json  what is committed: next batch and position in the shard,
                                    parts written, images scored, skipped files (path and
                                    reason), scoring seconds, the listing's fingerprint,
                                    the process count, batch and group size
  scores.csv                        file, score[, label][, predicted_label]: every scored
                                    image, sorted by file
  scores.parquet                    the same rows, when `pyarrow` can be imported
  maps_index.csv                    with `maps`: file, map shard, row of every scored image
  pictures/<rank>_<name>.png        with `top_pictures`: overlays of the highest scores
  summary.json                      images, skipped with reasons, images/s per process
                                    and its share of time spent waiting for the input
                                    (`input_share`), wall time, the start-up time to the
                                    first scores (`startup_seconds`: loading and
                                    compiling), image metrics when labelled, threshold,
                                    maps and pictures

Each host shows one progress line for its shard (`progress_line`: images done / total,
images/s, time left; on one host that is the whole run). The input pipeline (`reader`:
worker threads decode and resize ahead of the device) should never hold the device up:
each process measures the time it waited for the next batch (while the device may still
work on the one before: an upper bound of the device's idle time), the summary gives its share
of the scoring time, and a run that waited more than a quarter of it says so
with what to change (`input_wait`).

All processes commit at the same global batch counts (every `commit_every` batches and at
the end): the map shard (when maps are kept) and the part are written under a temporary
name, fsynced and renamed, and only then the progress record (the same way), so a record
never counts a part or maps that are not whole. On start each process reads its record;
part and map files beyond it (a kill between them and the record) are deleted. The
processes resume together from the smallest recorded batch; a process that had committed
further re-scores those batches without writing their rows (or maps) again, so every image
is written exactly once. A finished run does no scoring on a rerun (not even loading the
model). A record of another process count, file list, batch or group size is refused with
a `ConfigError` saying what changed, and so is a committed input (scored or skipped) whose
path, size, modification time or CSV label changed since (`shards.changed_inputs`: every
committed file is stat-ed on each rerun, a finished run's too).

Trust: one run at a time holds the work directory (`lock`); temporary files a killed
merge left beside the outputs are deleted under that lock. Every batch's maps and scores
are checked: a NaN or infinite value in a valid row stops the run with a
`CheckpointError` naming the model and the first affected image, before that batch is
committed (on several processes the processes agree at the next commit point, so all of
them stop there, with nothing of the window committed). A run that scores no image at all
(every listed file missing or unreadable) ends with a `DataError` naming the first file,
where it was looked up and why it was skipped (after writing `summary.json`).

Transductive detectors (an image's score depends on the images scored with it) score
groups: with `group_size`, the global batch is the group (`group_batch_size`: the group
size rounded up to a multiple of the device count) and every group is committed on its
own. A group is the consecutive images of the sorted listing that its batch holds (each
process's consecutive share of its shard), so a rerun forms the same groups; rows that are
padding or unreadable files are marked invalid and take no part in their group's scores.

The parts live in `shards`, the merged outputs are written by `merge`; their names are
importable from here as well.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax import batch_step, input_wait, parallel
from maeday_jax.bulk import lock, maps_store, reader
from maeday_jax.bulk.merge import (
  INDEX_FILE,
  PARQUET_FILE,
  PICTURES_FOLDER,
  SCORES_FILE,
  SUMMARY_FILE,
  draw_top_pictures,
  image_metrics,
  merge,
  picture_name,
  remove_stale_temporaries,
)
from maeday_jax.bulk.progress_line import host_progress
from maeday_jax.bulk.shards import (
  PART_COLUMNS,
  PROGRESS_FILE,
  SHARDS_FOLDER,
  Progress,
  ShardStore,
  agree,
  changed_inputs,
  part_name,
)
from maeday_jax.bulk.source import Listing, output_name
from maeday_jax.checkpoints import CheckpointError
from maeday_jax.config_errors import ConfigError
from maeday_jax.data import DataError
from maeday_jax.data.pipeline import batches_per_shard

log = logging.getLogger("maeday_jax")

_image_metrics = image_metrics  # The name the tests know.

__all__ = [
  "INDEX_FILE",
  "PARQUET_FILE",
  "PART_COLUMNS",
  "PICTURES_FOLDER",
  "PROGRESS_FILE",
  "SCORES_FILE",
  "SHARDS_FOLDER",
  "SUMMARY_FILE",
  "Progress",
  "ShardStore",
  "draw_top_pictures",
  "group_batch_size",
  "image_metrics",
  "merge",
  "part_name",
  "picture_name",
  "score_listing",
]


def group_batch_size(group_size: int, device_count: int) -> int:
  """The global batch that scores groups of `group_size` images: rounded up to a multiple
  of `device_count`, since every device scores the same number of rows."""
  if group_size < 1:
    raise ValueError(f"group_size must be positive, got {group_size}")
  return -(-group_size // device_count) * device_count


def score_listing(
  listing: Listing,
  workdir: str | os.PathLike,
  *,
  make_scoring: Callable[[], object],
  batch_size: int,
  commit_every: int = 50,
  progress: bool = True,
  threshold: float | None = None,
  maps: str = "none",
  top_pictures: int = 0,
  group_size: int = 0,
  detector: str = "",
  started: float | None = None,
) -> dict:
  """Scores this process's shard of `listing`, then (process 0) writes the merged outputs.

  A collective: every process calls it with the same listing and settings.

  Args:
    listing: what to score (`source.list_source`), the same on every process.
    workdir: the run's work directory.
    make_scoring: builds the `evaluation.Scoring` (called only when work remains).
    batch_size: the global batch (images), a multiple of the device count.
    commit_every: commit every this many global batches (and at the end).
    progress: show this host's progress line (`progress_line`).
    threshold: when given, `scores.csv` gets `predicted_label` (1 where score >= it).
    maps: 'none', or the dtype ('float16', 'uint8') each commit stores the maps in
      (`maps_store`).
    top_pictures: after the merge, draw overlays of this many highest-scoring images
      (needs `maps`).
    group_size: for a transductive detector, the group size asked for (0: images are
      scored independently). `batch_size` must then be `group_batch_size(group_size,
      device count)`: the global batch is the group, and each group is committed on its
      own (`commit_every` does not apply). Recorded, so that a resume with another group
      size is refused.
    detector: where the model comes from, for messages (a fitted detector folder), besides
      `Scoring.name`.
    started: when the job began (`time.perf_counter()`), for the start-up time to the
      first scores (`startup_seconds` in the summary); default: when this call began.

  Returns:
    The summary (`summary.json`) on every process.

  Raises:
    WorkdirLocked: another run holds the work directory (`lock`).
    ConfigError: a record of another run, or committed inputs that changed since.
    CheckpointError: the model gives NaN or infinite maps or scores (nothing of the
      batch is committed).
    DataError: no listed image could be scored (after `summary.json` is written).
  """
  job_started = time.perf_counter() if started is None else started
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  index, count = jax.process_index(), jax.process_count()
  if maps not in maps_store.MAP_DTYPES:
    raise ConfigError(f"--config.outputs.maps: {maps!r} is not one of {maps_store.MAP_DTYPES}.")
  if top_pictures > 0 and maps == "none":
    raise ConfigError(
      "--config.outputs.top_pictures needs the maps: set --config.outputs.maps to float16 or uint8."
    )
  if batch_size % count:
    raise ConfigError(f"--config.batch_size: {batch_size} does not split over {count} processes.")
  if group_size:
    expected = group_batch_size(group_size, jax.device_count())
    if batch_size != expected:
      raise ValueError(
        f"groups of {group_size} are scored in batches of {expected}, not {batch_size}"
      )
    commit_every = 1  # The group is the unit of work: a kill loses at most the one in flight.
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
    group_size=group_size,
  )
  with lock.hold(workdir):  # Before any record is read: nothing may change under us.
    if index == 0:
      remove_stale_temporaries(workdir)  # A merge killed half way; no one else writes.
    recorded = store.read()
    changed = (0, [])
    if recorded is not None and recorded.parts + len(recorded.skipped) > 0:
      changed = changed_inputs(store, recorded, listing)
    start = agree(recorded, fresh, listing, changed)
    record = recorded or fresh
    store.remove_uncommitted(record.parts)
    if recorded is None:
      store.write(record)
    if start < total_batches:
      scoring = make_scoring()
      model = f"{scoring.name} ({detector})" if detector else (scoring.name or "the model")
      _score(
        listing,
        shard,
        store,
        record,
        start,
        scoring,
        commit_every,
        progress,
        maps,
        model,
        job_started,
      )
    else:
      log.info("Every image of %s is already scored; nothing to do.", listing.source)
    parallel.barrier("maeday_jax: bulk scoring done")
    if index == 0:
      merge(
        workdir,
        listing,
        count,
        wall_seconds=time.perf_counter() - started,
        threshold=threshold,
        maps=maps,
        top_pictures=top_pictures,
      )
    parallel.barrier("maeday_jax: bulk scores merged")
  summary = json.loads((workdir / SUMMARY_FILE).read_text())
  if summary["images"] == 0:
    raise DataError(nothing_scored(listing, summary, workdir))
  return summary


def nothing_scored(listing: Listing, summary: dict, workdir) -> str:
  """The error of a run that scored no image: the first listed file, where it was looked
  up and why it was skipped."""
  name, path = listing.files[0], listing.paths[0]
  shown = output_name(name)
  reason = next((s["reason"] for s in summary["skipped"] if s["file"] == shown), "not scored")
  where = ""
  if listing.kind == "manifest":
    if os.path.isabs(os.path.expanduser(name)):
      where = f" ({output_name(path)})"
    else:
      where = (
        f", looked up as {output_name(path)} (a manifest's relative paths are resolved "
        f"against its folder, {output_name(listing.base)})"
      )
  elif listing.kind == "folder":
    where = f" in {output_name(listing.base)}"
  return (
    f"--config.data.path={output_name(listing.source)}: no image could be scored: all "
    f"{summary['listed']} listed file(s) were skipped (each with its reason in "
    f"{pathlib.Path(workdir) / SUMMARY_FILE}). The first: {shown}{where}: {reason}"
  )


def _rows_finite(maps):
  """Whether each row of a batch of maps is finite everywhere: reduced on device, so that
  only B booleans are fetched when the maps themselves are not kept (maps a native step
  already returned as NumPy: reduced here)."""
  if isinstance(maps, np.ndarray):
    return np.isfinite(maps).reshape(len(maps), -1).all(axis=1)
  return _rows_finite_on_device(maps)


@jax.jit
def _rows_finite_on_device(maps):
  return jnp.all(jnp.isfinite(maps), axis=tuple(range(1, maps.ndim)))


def _non_finite(model: str, listing: Listing, position: int, bad: int, valid: int) -> str:
  return (
    f"{model} gives NaN or infinite anomaly maps or scores, first for "
    f"{output_name(listing.files[position])} ({bad} of the {valid} images of its batch on "
    "this process). The run stops without committing them (what is committed is kept). "
    "The weights or the fitted state are corrupt, or overflow in this dtype: check the "
    "checkpoint or detector artifact, or use --config.model.dtype=float32."
  )


def _score(
  listing,
  shard,
  store: ShardStore,
  record: Progress,
  start,
  scoring,
  commit_every,
  show,
  maps,
  model: str,
  job_started: float,
):
  """Runs global batches `start, ...` of this shard, committing this process's new rows.

  Raises:
    CheckpointError: non-finite maps or scores (see `score_listing`).
  """
  total = record.num_batches
  count = record.process_count
  paths = listing.paths[shard.start : shard.stop]
  own_from = record.next_batch  # Batches before it are already committed here.
  rows: list[tuple] = []
  row_maps: list[np.ndarray] = []  # With `maps`: the rows' maps, in row order.
  skipped: list[dict] = []
  scored = 0
  committed_wait = 0.0  # Of `batches.waited`, what the last commit recorded.
  failure: tuple[int, str] | None = None  # (listing position, message) of the first.
  last = time.perf_counter()
  bar = host_progress(len(shard), start * record.batch_size, jax.process_index(), count, show=show)

  def check_finite(batch: reader.Batch, finite: np.ndarray) -> None:
    """Records (one process: raises) the first valid row that is not finite."""
    nonlocal failure
    bad = np.flatnonzero(batch.valid & ~finite)
    if bad.size and failure is None:
      position = shard.start + int(batch.positions[bad[0]])
      message = _non_finite(model, listing, position, bad.size, int(batch.valid.sum()))
      failure = (position, message)
    if failure is not None and count == 1:
      raise CheckpointError(failure[1])

  def agree_finite() -> None:
    """Several processes: all stop together, at a commit point all of them reach."""
    gathered = parallel.allgather_arrays(
      {
        "message": np.asarray(failure[1] if failure else ""),
        "position": np.asarray(failure[0] if failure else -1, np.int64),
      }
    )
    failures = [(int(g["position"]), str(g["message"])) for g in gathered if str(g["message"])]
    if failures:
      raise CheckpointError(min(failures)[1])

  def finish(batch: reader.Batch, device_maps, device_scores) -> None:
    nonlocal scored, last
    own = batch.index >= own_from
    if maps != "none" and own:
      local_maps, scores = parallel.to_local_numpy((device_maps, device_scores), scoring.mesh)
      finite = np.isfinite(local_maps).reshape(len(local_maps), -1).all(axis=1)
    else:
      scores, finite = parallel.to_local_numpy(
        (device_scores, _rows_finite(device_maps)), scoring.mesh
      )
    if batch.index == start:  # This run's first scores: recorded at its first commit.
      record.startup_seconds = round(time.perf_counter() - job_started, 3)
    check_finite(batch, finite & np.isfinite(scores))
    if own and failure is None:
      for row in np.flatnonzero(batch.valid):
        i = shard.start + int(batch.positions[row])
        label = "" if listing.labels is None else listing.labels[i]
        # PART_COLUMNS: the input's fingerprint as it was read, for reruns to compare.
        fingerprint = (listing.paths[i], *(int(v) for v in batch.stats[row]))
        rows.append((i, listing.files[i], repr(float(scores[row])), label, *fingerprint))
        if maps != "none":
          row_maps.append(local_maps[row])
      scored += int(batch.valid.sum())
      for position, path, reason in batch.skipped:
        i = shard.start + position
        name = listing.files[i]
        log.warning("Skipped %s: %s", output_name(name), reason)
        size, mtime = (int(v) for v in batch.stats[position - batch.index * record.batch_size])
        entry = {"file": name, "path": path, "reason": reason, "index": i}
        skipped.append({**entry, "size": size, "mtime_ns": mtime})
    bar.update(batch.covered)
    done = batch.index + 1
    if done % commit_every == 0 or done == total:
      if count > 1:
        agree_finite()  # Every process reaches this point at the same batch.
      if done > record.next_batch:
        commit(done)

  def commit(done: int) -> None:
    nonlocal scored, last, committed_wait
    if rows:
      if maps != "none":  # Before the part and the record: both count it.
        store.write_maps(record.parts, np.stack(row_maps), [r[1] for r in rows], maps)
      store.write_part(record.parts, rows)
      record.parts += 1
    now = time.perf_counter()
    record.next_batch = done
    record.next_position = min(len(shard), done * record.batch_size)
    record.images += scored
    record.seconds += now - last
    record.input_wait_seconds += batches.waited - committed_wait
    committed_wait = batches.waited
    record.skipped.extend(skipped)
    store.write(record)  # After the part: the record never counts a missing part.
    rows.clear()
    row_maps.clear()
    skipped.clear()
    scored, last = 0, now

  pending = None
  read = reader.read_batches(
    paths,
    record.batch_size,
    scoring.image_size,
    first_batch=start,
    stop_batch=total,
    num_workers=scoring.num_workers,
    prefetch=scoring.prefetch,
    aspect=scoring.aspect,
  )
  # Closed however the loop ends: the decoding threads stop with it, before the lock goes.
  with bar, input_wait.watched(read, scoring.num_workers) as batches:
    for batch in batches:
      device_maps, device_scores = batch_step.dispatch(
        scoring.score_fn,
        scoring.replicated,
        batch.images,
        scoring.key,
        scoring.mesh,
        scoring.resize_fn,
        valid=batch.valid,  # Transductive detectors: padding and unreadable files are out.
      )
      # The device works on this batch while the previous one is committed (a native
      # step returns once its passes are done: it overlaps within the batch instead).
      if pending is not None:
        finish(*pending)
      pending = (batch, device_maps, device_scores)
    if pending is not None:
      finish(*pending)

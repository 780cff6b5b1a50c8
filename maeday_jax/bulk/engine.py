"""Scoring a listing on every process, committing as it goes, resuming where it stopped.

    listing = source.list_source("/photos")
    summary = engine.score_listing(listing, workdir, make_scoring=build, batch_size=64)

Every process scores its own shard (`Listing.shard`) in batches of `batch_size //
process_count` images, and every process runs the same number of global batches (a
shorter shard's last batches are padding), so the compiled step's collectives line up.

On disk, under the work directory:

  shards/process_<i>/part_<n>.csv   the rows (index, file, score[, label]) of the n-th commit
  shards/process_<i>/maps_<n>.npz   with `maps`: those rows' anomaly maps (`maps_store`)
  shards/process_<i>/progress.json  what is committed: next batch and position in the shard,
                                    parts written, images scored, skipped files (path and
                                    reason), scoring seconds, the listing's fingerprint and
                                    the process count
  scores.csv                        file, score[, label][, predicted_label]: every scored
                                    image, sorted by file
  scores.parquet                    the same rows, when `pyarrow` can be imported
  maps_index.csv                    with `maps`: file, map shard, row of every scored image
  pictures/<rank>_<name>.png        with `top_pictures`: overlays of the highest scores
  summary.json                      images, skipped with reasons, images/s per process,
                                    wall time, image metrics when labelled, threshold,
                                    maps and pictures

All processes commit at the same global batch counts (every `commit_every` batches and at
the end): the map shard (when maps are kept) and the part are written under a temporary
name, fsynced and renamed, and only then the progress record (the same way), so a record
never counts a part or maps that are not whole. On start each process reads its record;
part and map files beyond it (a kill between them and the record) are deleted. The
processes resume together from the smallest recorded batch; a process that had committed
further re-scores those batches without writing their rows (or maps) again, so every image
is written exactly once. A finished run does no work on a rerun
(not even loading the model). A record of another process count or another file list is
refused with a `ConfigError` saying what changed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import heapq
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from maeday_jax import atomic_files, metrics, parallel, pictures, zero_shot
from maeday_jax.bulk import maps_store, reader, source
from maeday_jax.bulk.source import Fingerprint, Listing
from maeday_jax.config_errors import ConfigError
from maeday_jax.data.images import read_image
from maeday_jax.data.pipeline import batches_per_shard
from maeday_jax.reports import spreadsheet_safe

log = logging.getLogger("maeday_jax")

SHARDS_FOLDER = "shards"
PROGRESS_FILE = "progress.json"
SCORES_FILE = "scores.csv"
SUMMARY_FILE = "summary.json"
INDEX_FILE = maps_store.INDEX_FILE
PARQUET_FILE = "scores.parquet"
PICTURES_FOLDER = "pictures"
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

  def maps_path(self, number: int) -> pathlib.Path:
    return self.folder / maps_store.shard_name(number)

  def write_maps(self, number: int, maps: np.ndarray, files: list[str], dtype: str) -> None:
    maps_store.write_shard(self.maps_path(number), maps, files, dtype)

  def remove_uncommitted(self, parts: int) -> None:
    """Deletes part and map files the record does not count, and stray temporary files."""
    if not self.folder.is_dir():
      return
    for path in self.folder.iterdir():
      name = path.name
      stale = False
      for prefix, suffix in (("part_", ".csv"), ("maps_", ".npz")):
        if name.startswith(prefix) and name.endswith(suffix):
          try:
            stale = int(name[len(prefix) : -len(suffix)]) >= parts
          except ValueError:
            stale = False
      if stale or atomic_files.TEMPORARY_MARKER in name:
        path.unlink(missing_ok=True)

  def part_rows(self, number: int) -> list[dict]:
    """The rows of the `number`-th committed part."""
    with open(self.folder / part_name(number), newline="", encoding="utf-8") as f:
      return list(csv.DictReader(f))

  def rows(self, progress: Progress) -> Iterator[dict]:
    """The committed rows, in commit order."""
    for number in range(progress.parts):
      yield from self.part_rows(number)


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
  threshold: float | None = None,
  maps: str = "none",
  top_pictures: int = 0,
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
    threshold: when given, `scores.csv` gets `predicted_label` (1 where score >= it).
    maps: 'none', or the dtype ('float16', 'uint8') each commit stores the maps in
      (`maps_store`).
    top_pictures: after the merge, draw overlays of this many highest-scoring images
      (needs `maps`).

  Returns:
    The summary (`summary.json`) on every process.
  """
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
    scoring = make_scoring()
    _score(listing, shard, store, record, start, scoring, commit_every, progress, maps)
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
  return json.loads((workdir / SUMMARY_FILE).read_text())


def _score(
  listing, shard, store: ShardStore, record: Progress, start, scoring, commit_every, show, maps
):
  """Runs global batches `start, ...` of this shard, committing this process's new rows."""
  total = record.num_batches
  count = record.process_count
  paths = listing.paths[shard.start : shard.stop]
  own_from = record.next_batch  # Batches before it are already committed here.
  rows: list[tuple] = []
  row_maps: list[np.ndarray] = []  # With `maps`: the rows' maps, in row order.
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

  def finish(batch: reader.Batch, device_maps, device_scores) -> None:
    nonlocal scored, last
    own = batch.index >= own_from
    if maps != "none" and own:
      local_maps, scores = parallel.to_local_numpy((device_maps, device_scores), scoring.mesh)
    else:
      scores = parallel.to_local_numpy(device_scores, scoring.mesh)
    if own:
      for row in np.flatnonzero(batch.valid):
        i = shard.start + int(batch.positions[row])
        label = "" if listing.labels is None else listing.labels[i]
        rows.append((i, listing.files[i], repr(float(scores[row])), label))
        if maps != "none":
          row_maps.append(local_maps[row])
      scored += int(batch.valid.sum())
      for position, path, reason in batch.skipped:
        name = listing.files[shard.start + position]
        log.warning("Skipped %s: %s", name, reason)
        skipped.append({"file": name, "path": path, "reason": reason})
    bar.update(batch.covered * count)
    done = batch.index + 1
    if (done % commit_every == 0 or done == total) and done > record.next_batch:
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
      record.skipped.extend(skipped)
      store.write(record)  # After the part: the record never counts a missing part.
      rows.clear()
      row_maps.clear()
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
      device_maps, device_scores = scoring.score_fn(scoring.replicated, images, ids, scoring.key)
      # The device works on this batch while the previous one is committed.
      if pending is not None:
        finish(*pending)
      pending = (batch, device_maps, device_scores)
    if pending is not None:
      finish(*pending)


def _parquet_writer(stack: contextlib.ExitStack, path, with_label: bool, with_prediction: bool):
  """A function writing one table of score columns to `path` (atomically, when `stack`
  closes without an error), or None when `pyarrow` cannot be imported."""
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    log.info("pyarrow is not installed: %s is not written (scores.csv is).", PARQUET_FILE)
    return None
  fields = [pa.field("file", pa.string()), pa.field("score", pa.float64())]
  if with_label:
    fields.append(pa.field("label", pa.int64()))
  if with_prediction:
    fields.append(pa.field("predicted_label", pa.int64()))
  schema = pa.schema(fields)

  tmp = stack.enter_context(atomic_files.replace_when_done(path))
  writer = stack.enter_context(pq.ParquetWriter(str(tmp), schema))

  def write(columns: dict) -> None:
    writer.write_table(pa.table(columns, schema=schema))

  return write


def _image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
  """Image AUROC / AP / F1-max (None, with the reason under 'undefined', when undefined)."""
  known = labels != source.UNKNOWN_LABEL
  result: dict = {
    "labelled": int(known.sum()),
    "anomalous": int((labels[known] == 1).sum()),
    "normal": int((labels[known] == 0).sum()),
    "undefined": {},
  }
  for name, metric in (
    ("image_auroc", metrics.image_auroc),
    ("image_ap", metrics.image_ap),
    ("image_f1_max", metrics.f1_max),
  ):
    try:
      result[name] = float(metric(scores, labels))
    except (metrics.MetricUndefinedError, ValueError) as e:
      result[name] = None
      result["undefined"][name] = getattr(e, "reason", str(e))
  return result


def picture_name(rank: int, file: str) -> str:
  """`<rank>_<name>.png`: the image's name with its folders joined by '_', no suffix."""
  stem = os.path.splitext(file.replace("\\", "/").strip("/"))[0]
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem.replace("/", "_"))
  return f"{rank}_{safe[-120:] or 'image'}.png"


def draw_top_pictures(workdir, listing: Listing, top: list[tuple[float, int]]) -> list[dict]:
  """Overlays of the images `top` ((score, listing position), highest first)."""
  workdir = pathlib.Path(workdir)
  names = [listing.files[i] for _, i in top]
  loaded = maps_store.load_maps(workdir, names)
  drawn = []
  for rank, (score, i) in enumerate(top, start=1):
    name = listing.files[i]
    path = workdir / PICTURES_FOLDER / picture_name(rank, name)
    try:
      image = read_image(listing.paths[i])
    except Exception as e:  # A file changed since it was scored must not stop the merge.
      log.warning("No picture of %s: %s", name, e)
      continue
    pictures.save_overlay(path, image, loaded[name])
    drawn.append({"rank": rank, "file": name, "score": score, "picture": str(path)})
  return drawn


def merge(
  workdir: str | os.PathLike,
  listing: Listing,
  process_count: int,
  wall_seconds=0.0,
  *,
  threshold: float | None = None,
  maps: str = "none",
  top_pictures: int = 0,
):
  """Writes `scores.csv`, `scores.parquet`, `maps_index.csv`, pictures and `summary.json`.

  Rows are streamed in listing order (shards are contiguous and sorted), one part at a
  time, so memory grows only by the scores and labels kept for the metrics (two numbers
  an image). `scores.parquet` is written only when `pyarrow` can be imported.

  Raises:
    RuntimeError: the parts do not account for every listed image exactly once.
  """
  workdir = pathlib.Path(workdir)
  with_label = listing.labels is not None
  with_prediction = threshold is not None
  header = ["file", "score", *(["label"] if with_label else [])]
  header += ["predicted_label"] if with_prediction else []
  records = []
  images, previous, predicted = 0, -1, 0
  all_scores: list[float] = []
  all_labels: list[int] = []
  top: list[tuple[float, int]] = []  # A min-heap of the `top_pictures` highest scores.
  index_entries: list[tuple[str, str, int]] = []
  with contextlib.ExitStack() as stack:
    tmp = stack.enter_context(atomic_files.replace_when_done(workdir / SCORES_FILE))
    f = stack.enter_context(open(tmp, "x", newline="", encoding="utf-8"))
    # Closed first (the stack unwinds in reverse): the Parquet file is whole before the CSV.
    parquet = _parquet_writer(stack, workdir / PARQUET_FILE, with_label, with_prediction)
    writer = csv.writer(f)
    writer.writerow(header)
    for index in range(process_count):
      store = ShardStore(workdir, index)
      record = store.read()
      if record is None or not record.done:
        raise RuntimeError(f"{store.folder}: the shard of process {index} is not finished.")
      records.append(record)
      for number in range(record.parts):
        part = store.part_rows(number)
        if maps != "none":
          shard = store.maps_path(number)
          listed = maps_store.shard_files(shard)
          if listed != [row["file"] for row in part]:
            raise RuntimeError(f"{shard}: its maps are not those of {part_name(number)}.")
          relative = str(shard.relative_to(workdir))
          index_entries.extend((name, relative, r) for r, name in enumerate(listed))
        columns: dict[str, list] = {name: [] for name in header}
        for row in part:
          position = int(row["index"])
          if position <= previous:
            raise RuntimeError(f"{store.folder}: row {row['file']!r} is out of order or repeated.")
          previous = position
          score = float(row["score"])
          cells = [spreadsheet_safe(row["file"]), row["score"]]
          columns["file"].append(row["file"])
          columns["score"].append(score)
          if with_label:
            cells.append(row["label"])
            columns["label"].append(int(row["label"]))
            all_labels.append(int(row["label"]))
          if with_prediction:
            flag = int(score >= threshold)
            cells.append(flag)
            columns["predicted_label"].append(flag)
            predicted += flag
          writer.writerow(cells)
          all_scores.append(score)
          if top_pictures > 0:
            entry = (score, -position)
            if len(top) < top_pictures:
              heapq.heappush(top, entry)
            else:
              heapq.heappushpop(top, entry)
          images += 1
        if parquet is not None:
          parquet(columns)
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
    "scores_parquet": str(workdir / PARQUET_FILE) if (workdir / PARQUET_FILE).is_file() else None,
    "threshold": None if threshold is None else {"method": "fixed", "value": threshold},
    "predicted_anomalous": predicted if with_prediction else None,
    "metrics": (
      _image_metrics(np.asarray(all_scores, np.float64), np.asarray(all_labels, np.int64))
      if with_label
      else None
    ),
    "maps": None if maps == "none" else {"dtype": maps, "index": str(workdir / INDEX_FILE)},
    "pictures": [],
  }
  if maps != "none":
    maps_store.write_index(workdir, index_entries)
  if top_pictures > 0:
    ranked = [(score, -negative) for score, negative in sorted(top, reverse=True)]
    summary["pictures"] = draw_top_pictures(workdir, listing, ranked)
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

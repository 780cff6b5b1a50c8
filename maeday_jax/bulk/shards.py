"""One process's committed work on disk, and the agreement on where every process resumes.

Under the work directory, each process owns `shards/process_<i>/`:

  part_<n>.csv   the rows of its n-th commit (`PART_COLUMNS`): index in the listing, file
                 (as listed), score, label, and the input's fingerprint when it was read:
                 path, size and modification time (`st_mtime_ns`)
  maps_<n>.npz   with maps: those rows' anomaly maps (`maps_store`)
  progress.json  what is committed (`Progress`): next batch and position in the shard,
                 parts written, images scored, skipped files (index, path, reason and the
                 same fingerprint), scoring seconds, the listing's fingerprint, the process
                 count, the batch and (transductive detectors) the group size

Parts and records keep names that are not valid UTF-8 as they are listed (written with
'surrogateescape'): internal files, read back exactly; the merged outputs escape them.

A commit writes the map shard (when maps are kept) and the part under a temporary name,
fsynced and renamed, and only then the progress record (the same way), so a record never
counts a part or maps that are not whole. On start each process reads its record and
deletes part and map files beyond it (a kill between them and the record). `agree` then
checks every process's record against this run, and every committed input (scored or
skipped) against the file on disk now (`changed_inputs`: path, size, modification time,
and a CSV manifest's label), and returns the smallest recorded batch, from which all
processes resume together. A committed input that changed is refused: its score would be
stale.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import typing
from collections.abc import Iterator

import numpy as np

from maeday_jax import atomic_files, parallel
from maeday_jax.bulk import maps_store, reader
from maeday_jax.bulk.source import Fingerprint, Listing, output_name
from maeday_jax.config_errors import ConfigError

log = logging.getLogger("maeday_jax")

SHARDS_FOLDER = "shards"
PROGRESS_FILE = "progress.json"
PART_COLUMNS = ("index", "file", "score", "label", "path", "size", "mtime_ns")
# Parts and records hold names as listed, bytes names included (see the module docstring).
PART_ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}
CHANGED_EXAMPLES = 5  # Changed inputs named in the error (all are counted).
STAT_THREADS = 16  # Stat-ing is latency-bound on network file systems: threads overlap it.


def part_name(number: int) -> str:
  """The file name of a process's `number`-th part."""
  return f"part_{number}.csv"


@dataclasses.dataclass
class Progress:
  """One process's committed state (`progress.json`)."""

  process_index: int
  process_count: int
  fingerprint: dict
  batch_size: int  # This process's batch.
  num_batches: int  # Global batches every process runs.
  # Transductive detectors: the requested group size (0: images scored independently).
  # Records written before groups existed read as 0.
  group_size: int = 0
  next_batch: int = 0
  next_position: int = 0  # In the shard: positions before it are scored or skipped.
  parts: int = 0
  images: int = 0
  seconds: float = 0.0
  # Of `seconds`, those spent waiting for the input pipeline (reading, decoding, resizing)
  # with nothing to hand to the device. 0 in records of older versions.
  input_wait_seconds: float = 0.0
  # From the start of the latest run that scored here to its first scores on this process
  # (loading the model and compiling included). None in records of older versions.
  startup_seconds: float | None = None
  # [{"file", "path", "reason", "index", "size", "mtime_ns"}] (the last three: inputs'
  # fingerprints, absent from records written before they were kept).
  skipped: list = dataclasses.field(default_factory=list)

  @property
  def done(self) -> bool:
    return self.next_batch >= self.num_batches

  @classmethod
  def from_dict(cls, payload: dict) -> Progress:
    """The record of a `to_dict` payload (fields of newer versions ignored, of older ones
    defaulted).

    Raises:
      ValueError: not such a payload (a field missing or of the wrong type).
    """
    if not isinstance(payload, dict):
      kind = {list: "list", str: "string", type(None): "null"}.get(type(payload), "number")
      raise ValueError(f"a JSON {kind}, not an object")
    fields = {f.name for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in payload.items() if k in fields}
    try:
      record = cls(**kept)
    except TypeError as e:  # A required field missing.
      raise ValueError(str(e).removeprefix(f"{cls.__name__}.__init__() ")) from None
    for name, kinds in _field_types().items():
      value = getattr(record, name)
      if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} is {value!r}")
    for entry in record.skipped:
      if not isinstance(entry, dict) or not all(
        isinstance(entry.get(key), str) for key in ("file", "path", "reason")
      ):
        raise ValueError(f"a skipped entry is {entry!r}")
    return record

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "done": self.done}


@functools.cache
def _field_types() -> dict[str, tuple[type, ...]]:
  """What each field of a `Progress` may hold, from its annotation (JSON writes a whole
  float as an int, so a float field takes ints too)."""
  kinds = {}
  for name, hint in typing.get_type_hints(Progress).items():
    allowed = tuple(typing.get_origin(k) or k for k in (typing.get_args(hint) or (hint,)))
    kinds[name] = allowed + ((int,) if float in allowed else ())
  return kinds


class ShardStore:
  """The files of one process under `<workdir>/shards/process_<index>/`."""

  def __init__(self, workdir: str | os.PathLike, index: int):
    self.folder = pathlib.Path(workdir) / SHARDS_FOLDER / f"process_{index}"

  @property
  def progress_path(self) -> pathlib.Path:
    return self.folder / PROGRESS_FILE

  def read(self) -> Progress | None:
    """The committed record, or None before the first run wrote one.

    Raises:
      ConfigError: the file is not a record this version reads (edited or damaged).
    """
    if not self.progress_path.is_file():
      return None
    try:
      return Progress.from_dict(json.loads(self.progress_path.read_bytes()))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
      raise damaged(self.progress_path, e) from None

  def write(self, progress: Progress) -> None:
    """Replaces the record atomically."""
    atomic_files.write_text(
      self.progress_path, json.dumps(progress.to_dict(), indent=1, sort_keys=True)
    )

  def write_part(self, number: int, rows: list[tuple]) -> None:
    """Writes part `number` atomically (rows of `PART_COLUMNS`).

    Raises:
      ValueError: a score that is not finite (the engine refuses them before).
    """
    for row in rows:
      if not math.isfinite(float(row[2])):
        raise ValueError(f"non-finite score {row[2]} of {output_name(row[1])} not committed")
    with (
      atomic_files.replace_when_done(self.folder / part_name(number)) as tmp,
      open(tmp, "x", newline="", **PART_ENCODING) as f,
    ):
      writer = csv.writer(f)
      writer.writerow(PART_COLUMNS)
      writer.writerows(rows)
      f.flush()

  def maps_path(self, number: int) -> pathlib.Path:
    return self.folder / maps_store.shard_name(number)

  def write_maps(self, number: int, maps: np.ndarray, files: list[str], dtype: str) -> None:
    """Writes the maps of part `number` (`maps_store.write_shard`)."""
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
    """The rows of the `number`-th committed part.

    Raises:
      ConfigError: the part is missing, or edited or damaged (a column missing, an index
        or score that is not a number).
    """
    path = self.folder / part_name(number)
    try:
      with open(path, newline="", **PART_ENCODING) as f:
        rows = list(csv.DictReader(f))
      for row in rows:
        missing = [c for c in PART_COLUMNS[:4] if row.get(c) is None]
        if missing:
          raise ValueError(f"a row without {', '.join(missing)}")
        int(row["index"]), float(row["score"])
        if row.get("size"):
          int(row["size"]), int(row["mtime_ns"])
    except (OSError, ValueError, TypeError, csv.Error) as e:
      raise damaged(path, e) from None
    return rows

  def rows(self, progress: Progress) -> Iterator[dict]:
    """The committed rows, in commit order."""
    for number in range(progress.parts):
      yield from self.part_rows(number)


def damaged(path: pathlib.Path, why) -> ConfigError:
  """The error for a committed file (record, part, maps) that was edited or damaged."""
  return ConfigError(
    f"{path}: not what this job committed ({why}); it was edited or damaged. Restore it "
    f"to resume, or move the work directory aside to score everything again."
  )


def mismatch(progress: Progress, listing: Listing, new: Progress) -> str:
  """Why a recorded progress cannot be resumed by the run `new` describes ('' when it can)."""
  if progress.process_count != new.process_count:
    return (
      f"this work directory was scored by {progress.process_count} process(es), this run "
      f"has {new.process_count}: shards depend on the process count. Rerun with "
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
  # Before the batch: a new group size changes the batch too, and the group is the cause.
  if progress.group_size != new.group_size:
    return (
      f"this work directory was scored in groups of --config.group_size="
      f"{progress.group_size}, this run asks for {new.group_size}: a transductive "
      "detector's scores depend on their group. Use the same --config.group_size or a new "
      "--workdir."
    )
  if progress.batch_size != new.batch_size:
    return (
      f"this work directory was scored in batches of {progress.batch_size} per process, "
      f"this run uses {new.batch_size}; use the same --config.batch_size or a new --workdir."
    )
  return ""


def _changes(recorded: tuple, now: tuple, label: str | None, expected: str | None) -> str:
  """What differs between an input's recorded (path, size, mtime_ns) and `now` ('' none)."""
  (path, size, mtime), (new_path, new_size, new_mtime) = recorded, now
  if path != new_path:
    return f"now read from {output_name(new_path)}, scored from {output_name(path)}"
  if (size, mtime) != (new_size, new_mtime):
    if (size, mtime) == reader.MISSING:
      return "a file now, missing when scored"
    if (new_size, new_mtime) == reader.MISSING:
      return "missing now"
    if size != new_size:
      return f"{size} bytes when scored, {new_size} now"
    return "modified since it was scored"
  if label is not None and label != expected:
    return f"label {label or 'unknown'} when scored, {expected or 'unknown'} now"
  return ""


def changed_inputs(
  store: ShardStore, progress: Progress, listing: Listing
) -> tuple[int, list[str]]:
  """(count, first few descriptions) of this process's committed inputs (scored rows and
  skipped files) whose path, size, modification time or CSV label differs from now.

  Every committed file is stat-ed (in `STAT_THREADS` threads, one part per task, so that
  memory holds one part per thread): a rerun of a finished run of a million images costs
  a million `os.stat` calls. Rows committed before fingerprints were kept are not checked.
  """

  def expected_label(index: int) -> str:
    return "" if listing.labels is None else str(listing.labels[index])

  def check(entries) -> tuple[int, list[str], int]:
    count, shown, unchecked = 0, [], 0
    for index, name, path, size, mtime, label in entries:
      if size is None or index >= len(listing) or listing.files[index] != name:
        unchecked += size is None
        continue  # No fingerprint (an older record); a changed list is `mismatch`'s.
      now = (listing.paths[index], *reader.file_stat(listing.paths[index]))
      expected = None if label is None else expected_label(index)
      what = _changes((path, size, mtime), now, label, expected)
      if what:
        count += 1
        if len(shown) < CHANGED_EXAMPLES:
          shown.append(f"{output_name(name)} ({what})")
    return count, shown, unchecked

  def part_entries(number: int):
    for row in store.part_rows(number):
      size = row.get("size")
      fingerprint = (None, None) if size in (None, "") else (int(size), int(row["mtime_ns"]))
      yield (int(row["index"]), row["file"], row.get("path"), *fingerprint, row["label"])

  skipped_entries = [
    (s.get("index", len(listing)), s["file"], s["path"], s.get("size"), s.get("mtime_ns"), None)
    for s in progress.skipped
  ]
  count, shown, unchecked = 0, [], 0
  with concurrent.futures.ThreadPoolExecutor(STAT_THREADS, thread_name_prefix="bulk_stat") as pool:
    tasks = [pool.submit(check, list(part_entries(n))) for n in range(progress.parts)]
    tasks.append(pool.submit(check, skipped_entries))
    for task in tasks:
      part_count, part_shown, part_unchecked = task.result()
      count += part_count
      shown += part_shown[: CHANGED_EXAMPLES - len(shown)]
      unchecked += part_unchecked
  if unchecked:
    log.info(
      "%d committed input(s) of %s were recorded without their size and modification "
      "time (an older version): whether they changed is not checked.",
      unchecked,
      store.folder,
    )
  return count, shown


def agree(
  progress: Progress | None,
  new: Progress,
  listing: Listing,
  changed: tuple[int, list[str]] = (0, []),
) -> int:
  """Checks every process's record against this run (`new`, not yet written), and that
  none of the inputs it committed changed (`changed`: this process's `changed_inputs`);
  returns the batch all processes resume from. A collective.

  Raises:
    ConfigError: a record of another run (process count, file list, group or batch size),
      committed inputs that changed since they were scored, or processes that list
      different files.
  """
  error = "" if progress is None else mismatch(progress, listing, new)
  record = progress or new
  count, shown = changed
  gathered = parallel.allgather_arrays(
    {
      "error": np.asarray(error),
      "next_batch": np.asarray(record.next_batch if not error else 0, np.int64),
      "sha256": np.asarray(listing.fingerprint.sha256),
      "changed_count": np.asarray(count, np.int64),
      # Names may hold any character: one per element, not joined by a separator.
      "changed": np.asarray(shown if shown else [""], dtype=str),
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
  total = sum(int(g["changed_count"]) for g in gathered)
  if total:
    examples = [str(c) for g in gathered for c in g["changed"] if str(c)][:CHANGED_EXAMPLES]
    more = f", and {total - len(examples)} more" if total > len(examples) else ""
    raise ConfigError(
      f"--config.data.path={listing.source}: {total} input(s) changed since this work "
      f"directory scored them: {'; '.join(examples)}{more}. Their committed scores would "
      "be stale, and a rerun does not rescore them: start fresh with --overwrite (clears "
      "this work directory) or a new --workdir."
    )
  return min(int(g["next_batch"]) for g in gathered)

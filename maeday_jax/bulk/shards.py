"""One process's committed work on disk, and the agreement on where every process resumes.

Under the work directory, each process owns `shards/process_<i>/`:

  part_<n>.csv   the rows (index, file, score, label) of its n-th commit
  maps_<n>.npz   with maps: those rows' anomaly maps (`maps_store`)
  progress.json  what is committed (`Progress`): next batch and position in the shard,
                 parts written, images scored, skipped files (path and reason), scoring
                 seconds, the listing's fingerprint, the process count, the batch and
                 (transductive detectors) the group size

A commit writes the map shard (when maps are kept) and the part under a temporary name,
fsynced and renamed, and only then the progress record (the same way), so a record never
counts a part or maps that are not whole. On start each process reads its record and
deletes part and map files beyond it (a kill between them and the record). `agree` then
checks every process's record against this run and returns the smallest recorded batch,
from which all processes resume together.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from maeday_jax import atomic_files, parallel
from maeday_jax.bulk import maps_store
from maeday_jax.bulk.source import Fingerprint, Listing
from maeday_jax.config_errors import ConfigError

SHARDS_FOLDER = "shards"
PROGRESS_FILE = "progress.json"
PART_COLUMNS = ("index", "file", "score", "label")


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
    """The committed record, or None before the first run wrote one."""
    if not self.progress_path.is_file():
      return None
    return Progress.from_dict(json.loads(self.progress_path.read_text()))

  def write(self, progress: Progress) -> None:
    """Replaces the record atomically."""
    atomic_files.write_text(
      self.progress_path, json.dumps(progress.to_dict(), indent=1, sort_keys=True)
    )

  def write_part(self, number: int, rows: list[tuple]) -> None:
    """Writes part `number` atomically (rows of `PART_COLUMNS`)."""
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
    """The rows of the `number`-th committed part."""
    with open(self.folder / part_name(number), newline="", encoding="utf-8") as f:
      return list(csv.DictReader(f))

  def rows(self, progress: Progress) -> Iterator[dict]:
    """The committed rows, in commit order."""
    for number in range(progress.parts):
      yield from self.part_rows(number)


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


def agree(progress: Progress | None, new: Progress, listing: Listing) -> int:
  """Checks every process's record against this run (`new`, not yet written); returns
  the batch all processes resume from. A collective.

  Raises:
    ConfigError: a record of another run (process count, file list, group or batch size),
      or processes that list different files.
  """
  error = "" if progress is None else mismatch(progress, listing, new)
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

"""The merged outputs of a finished bulk run, written by process 0.

    summary = merge.merge(workdir, listing, process_count, threshold=0.5, maps="uint8")

Under the work directory:

  scores.csv                 file, score[, label][, predicted_label]: every scored image,
                             sorted by file
  scores.parquet             the same rows, when `pyarrow` can be imported
  maps_index.csv             with maps: file, map shard, row of every scored image
  pictures/<rank>_<name>.png with `top_pictures`: overlays of the highest scores
  summary.json               images, skipped with reasons, images/s per process, wall
                             time, image metrics when labelled, threshold, maps and
                             pictures

The rows come from every process's committed parts (`shards`), streamed in listing order.

File names in the outputs: each image is named as listed (the first name in sorted order
when one file is listed under several, see `source`). Names that are not valid UTF-8 are
written with each undecodable byte as the four characters `\\xNN` (`source.output_name`,
Python's 'backslashreplace'; `maeday_jax.data.names.to_disk` gives the name on disk back)
in every output. `scores.csv` alone, being meant for spreadsheets, puts a `'` before a
name that starts with `=`, `+`, `-`, `@`, a tab or a carriage return
(`reports.spreadsheet_safe`: `=cmd.png` is written `'=cmd.png`); `scores.parquet`,
`maps_index.csv` and `summary.json` carry the name without it, so join on those (or drop
that one leading `'` of a `scores.csv` cell). A non-finite committed score is refused,
never written.
"""

from __future__ import annotations

import contextlib
import csv
import heapq
import json
import logging
import os
import pathlib
import zipfile

import numpy as np

from maeday_jax import atomic_files, input_wait, metrics, pictures
from maeday_jax.bulk import maps_store, source
from maeday_jax.bulk.shards import ShardStore, damaged, part_name
from maeday_jax.bulk.source import Listing, output_name
from maeday_jax.checkpoints import CheckpointError
from maeday_jax.data.images import read_image
from maeday_jax.reports import spreadsheet_safe

log = logging.getLogger("maeday_jax")

SCORES_FILE = "scores.csv"
SUMMARY_FILE = "summary.json"
INDEX_FILE = maps_store.INDEX_FILE
PARQUET_FILE = "scores.parquet"
PICTURES_FOLDER = "pictures"
# The outputs `merge` writes beside the shards (each through a temporary file).
MERGED_FILES = (SCORES_FILE, PARQUET_FILE, INDEX_FILE, SUMMARY_FILE)


def remove_stale_temporaries(workdir) -> None:
  """Deletes the temporary files of a merge that was killed half way (`.scores.csv.tmp-*`
  and the like, and those under `pictures/`). Only under the work directory's lock."""
  workdir = pathlib.Path(workdir)
  removed = atomic_files.remove_temporaries(workdir, MERGED_FILES)
  removed += atomic_files.remove_temporaries(workdir / PICTURES_FOLDER)
  if removed:
    log.info(
      "Deleted %d temporary file(s) of an interrupted merge: %s",
      len(removed),
      ", ".join(str(p) for p in removed[:3]) + (", ..." if len(removed) > 3 else ""),
    )


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


def image_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
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
    path = workdir / PICTURES_FOLDER / picture_name(rank, output_name(name))
    try:
      image = read_image(listing.paths[i])
    except Exception as e:  # A file changed since it was scored must not stop the merge.
      log.warning("No picture of %s: %s", output_name(name), e)
      continue
    pictures.save_overlay(path, image, loaded[name])
    drawn.append({"rank": rank, "file": output_name(name), "score": score, "picture": str(path)})
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
    ConfigError: the committed files (records, parts, maps) do not account for every
      listed image exactly once: edited or damaged.
    CheckpointError: a committed score is not finite (parts of an older version).
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
          try:
            listed = maps_store.shard_files(shard)
          except OSError as e:
            raise damaged(shard, e) from None
          # Not NumPy's own words: they would suggest unpickling the file.
          except (ValueError, KeyError, zipfile.BadZipFile):
            raise damaged(shard, "not a maps archive") from None
          if listed != [row["file"] for row in part]:
            raise damaged(shard, f"its maps are not those of {part_name(number)}")
          relative = str(shard.relative_to(workdir))
          index_entries.extend((output_name(name), relative, r) for r, name in enumerate(listed))
        columns: dict[str, list] = {name: [] for name in header}
        for row in part:
          position = int(row["index"])
          if position <= previous:
            raise damaged(
              store.folder / part_name(number), f"row {row['file']!r} is out of order or repeated"
            )
          previous = position
          score = float(row["score"])
          name = output_name(row["file"])
          if not np.isfinite(score):
            raise CheckpointError(
              f"{store.folder / part_name(number)}: the committed score of {name} is "
              f"{row['score']}: the model that scored this work directory was broken. "
              "Rerun with --overwrite (or a new --workdir) once it is fixed."
            )
          cells = [spreadsheet_safe(name), row["score"]]  # Spreadsheet quoting: CSV only.
          columns["file"].append(name)
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
  skipped = [{"file": output_name(name), "reason": reason} for name, reason in listing.skipped]
  skipped += [
    {"file": output_name(s["file"]), "reason": s["reason"]} for r in records for s in r.skipped
  ]
  unreadable = sum(len(r.skipped) for r in records)
  if images + unreadable != len(listing):
    raise damaged(
      workdir / "shards", f"{images} scored and {unreadable} skipped images, {len(listing)} listed"
    )
  summary = {
    "source": output_name(listing.source),
    "kind": listing.kind,
    "listed": len(listing),
    "fingerprint": listing.fingerprint.to_dict(),
    # Entries naming a file listed already (the same name, or another spelling of its
    # path); the first few as (dropped, kept).
    "duplicates": listing.duplicates,
    "duplicate_examples": [
      {"file": output_name(dropped), "same_as": output_name(kept)}
      for dropped, kept in listing.duplicate_examples
    ],
    "images": images,
    "skipped_count": len(skipped),
    "skipped": skipped,
    "processes": [
      {
        "process": r.process_index,
        "images": r.images,
        "seconds": round(r.seconds, 3),
        "images_per_second": round(r.images / r.seconds, 3) if r.seconds > 0 else None,
        "input_wait_seconds": round(r.input_wait_seconds, 3),
        "input_share": input_wait.share(r.input_wait_seconds, r.seconds),
        "startup_seconds": r.startup_seconds,
      }
      for r in records
    ],
    # The slowest process's share of its scoring time spent waiting for its input.
    "input_share": input_wait.slowest_share([(r.input_wait_seconds, r.seconds) for r in records]),
    "wall_seconds": round(wall_seconds, 3),
    # The slowest process's time to its first scores, in the latest run that scored.
    "startup_seconds": max(
      (r.startup_seconds for r in records if r.startup_seconds is not None), default=None
    ),
    "scores": str(workdir / SCORES_FILE),
    "scores_parquet": str(workdir / PARQUET_FILE) if (workdir / PARQUET_FILE).is_file() else None,
    "threshold": None if threshold is None else {"method": "fixed", "value": threshold},
    "predicted_anomalous": predicted if with_prediction else None,
    "metrics": (
      image_metrics(np.asarray(all_scores, np.float64), np.asarray(all_labels, np.int64))
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
    "Scored %d of %d images (%d skipped) on %d process(es), %.1f images/s per process "
    "(%.0f %% of the time waiting for input), in %.1f s: %s",
    images,
    len(listing),
    len(skipped),
    process_count,
    float(np.mean(rates)) if rates else 0.0,
    100 * (summary["input_share"] or 0.0),
    wall_seconds,
    workdir / SCORES_FILE,
  )
  return summary

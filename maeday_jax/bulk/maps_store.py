"""Anomaly maps of a bulk scoring run: one `.npz` shard per committed part, and an index.

With `outputs.maps` set to 'float16' or 'uint8', each commit of process i also writes the
maps of the rows it commits to `shards/process_<i>/maps_<n>.npz` (n: the part's number),
atomically and before the progress record. A shard holds:

  maps     (N, H, W) at the model's resolution: float16, or uint8 quantised per map
  files    (N,) the images' names, as listed (the same rows, in the same order, as the part)
  scale    (N,) float32, uint8 only: map = offset + scale * maps / 255
  offset   (N,) float32, uint8 only (each map's minimum; scale is its maximum - minimum)

float16 keeps about 3 significant digits (relative error <= 1e-3); uint8 is within
`scale / 255` of the float32 map (half that, rounded). The merge writes `maps_index.csv`
(file, shard, row; `shard` relative to the work directory) listing every scored image
once, and `load_map(workdir, file)` reads one map back through it. The index names each
file as `scores.parquet` does (`source.output_name`: never the `'` that `scores.csv` puts
before a name starting with `=`, `+`, `-`, `@`; undecodable bytes as `\\xNN`); `load_map`
takes that name or the name as listed.
"""

from __future__ import annotations

import csv
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from maeday_jax import atomic_files
from maeday_jax.bulk.source import output_name

MAP_DTYPES = ("none", "float16", "uint8")
INDEX_FILE = "maps_index.csv"
INDEX_COLUMNS = ("file", "shard", "row")


def shard_name(number: int) -> str:
  return f"maps_{number}.npz"


def encode(maps: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
  """The arrays a shard stores for float32 `maps` (N, H, W) in `dtype` (float16 | uint8)."""
  maps = np.asarray(maps, np.float32)
  if maps.ndim != 3:
    raise ValueError(f"maps must be (N, H, W), got shape {maps.shape}.")
  if dtype == "float16":
    return {"maps": maps.astype(np.float16)}
  if dtype == "uint8":
    offset = maps.min(axis=(1, 2)) if len(maps) else np.zeros((0,), np.float32)
    scale = maps.max(axis=(1, 2)) - offset if len(maps) else np.zeros((0,), np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None, None]
    values = np.rint((maps - offset[:, None, None]) / safe * 255.0)
    return {
      "maps": np.clip(values, 0, 255).astype(np.uint8),
      "scale": scale.astype(np.float32),
      "offset": offset.astype(np.float32),
    }
  raise ValueError(f"map dtype must be float16 or uint8, got {dtype!r}.")


def decode(arrays, rows=None) -> np.ndarray:
  """float32 maps from a shard's arrays (all rows, or the rows `rows`)."""
  maps = arrays["maps"] if rows is None else arrays["maps"][rows]
  if maps.dtype == np.uint8:
    scale = arrays["scale"] if rows is None else arrays["scale"][rows]
    offset = arrays["offset"] if rows is None else arrays["offset"][rows]
    scale, offset = np.asarray(scale, np.float32), np.asarray(offset, np.float32)
    return offset[..., None, None] + scale[..., None, None] * (maps.astype(np.float32) / 255.0)
  return maps.astype(np.float32)


def write_shard(path, maps: np.ndarray, files: Sequence[str], dtype: str) -> pathlib.Path:
  """Writes one shard atomically (a kill leaves the old file or none, never half a file)."""
  arrays = encode(maps, dtype)
  if len(files) != len(arrays["maps"]):
    raise ValueError(f"{len(files)} names for {len(arrays['maps'])} maps.")
  path = pathlib.Path(path)
  with atomic_files.replace_when_done(path) as tmp, open(tmp, "xb") as f:
    np.savez(f, files=np.asarray(list(files), dtype=str), **arrays)
  return path


def shard_files(path) -> list[str]:
  """The image names of a shard, in row order (reads only that array)."""
  with np.load(path, allow_pickle=False) as arrays:
    return [str(name) for name in arrays["files"]]


def write_index(workdir, entries: Iterable[tuple[str, str, int]]) -> pathlib.Path:
  """Writes `maps_index.csv` from (file, shard relative to `workdir`, row) entries."""
  path = pathlib.Path(workdir) / INDEX_FILE
  with (
    atomic_files.replace_when_done(path) as tmp,
    open(tmp, "x", newline="", encoding="utf-8") as f,
  ):
    writer = csv.writer(f)
    writer.writerow(INDEX_COLUMNS)
    writer.writerows(entries)
  return path


def locate(workdir: str | os.PathLike, files: Iterable[str]) -> dict[str, tuple[str, int]]:
  """(shard, row) of each of `files` (as listed, or as the index writes them) that the
  index lists (one pass over the index)."""
  wanted: dict[str, list[str]] = {}
  for name in files:
    wanted.setdefault(output_name(name), []).append(name)
  found: dict[str, tuple[str, int]] = {}
  with open(pathlib.Path(workdir) / INDEX_FILE, newline="", encoding="utf-8") as f:
    for entry in csv.DictReader(f):
      for name in wanted.get(entry["file"], ()):
        found[name] = (entry["shard"], int(entry["row"]))
  return found


def load_maps(workdir: str | os.PathLike, files: Sequence[str]) -> dict[str, np.ndarray]:
  """float32 (H, W) maps of `files`, read through the index (each shard opened once).

  Raises:
    FileNotFoundError: the run wrote no maps (no index).
    KeyError: a name the index does not list (not scored, or skipped).
  """
  workdir = pathlib.Path(workdir)
  where = locate(workdir, files)
  missing = [name for name in files if name not in where]
  if missing:
    raise KeyError(f"{workdir / INDEX_FILE} lists no map for {missing[:3]} ({len(missing)}).")
  by_shard: dict[str, list[str]] = {}
  for name in files:
    by_shard.setdefault(where[name][0], []).append(name)
  loaded = {}
  for shard, names in by_shard.items():
    with np.load(workdir / shard, allow_pickle=False) as arrays:
      rows = np.asarray([where[name][1] for name in names], np.int64)
      for name, values in zip(names, decode(arrays, rows), strict=True):
        loaded[name] = values
  return loaded


def load_map(workdir: str | os.PathLike, file: str) -> np.ndarray:
  """The float32 (H, W) anomaly map of the image named `file` (as listed)."""
  return load_maps(workdir, [file])[file]

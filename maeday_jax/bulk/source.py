"""Which images a bulk scoring run covers: listed once, sorted, split between processes.

`data.path` is one of:

- a folder: every file with an image suffix (`IMAGE_SUFFIXES`, any case) in it and its
  sub-folders, named by its path relative to the folder (`lineA/001.png`). Hidden entries
  (starting with `.`) are ignored. Links to folders are followed once; a link that loops
  back or leads to a folder already listed, and a broken link, are skipped with the reason.
- a glob (`/data/**/*.jpg`, `**` matches sub-folders): the matches with an image suffix,
  named as the pattern matched them. Python's `glob` rules apply: `**` follows links to
  folders (a link loop lists its files again under longer names; use a folder instead),
  and a broken link is listed, then skipped with the reason when it cannot be read.
- a manifest: a `.txt` file of paths, one a line (blank lines and lines starting with
  `#` ignored), or a `.csv` file with a header and the columns `path[,label][,mask]`
  (label: an integer, empty = -1 unknown). Relative paths are resolved against the
  manifest's folder; each image is named as the manifest writes it.

The listing uses `os.scandir` only (no file is opened or stat-ed beyond what listing a
folder needs), is sorted by name, and drops repeated names. Process `i` of `n` scores the
contiguous range `data.pipeline.shard_bounds(N, i, n)`. The `Fingerprint` (count and
SHA-256 of the sorted names) tells a rerun whether the list changed.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import logging
import os
from collections.abc import Sequence

from maeday_jax.config_errors import ConfigError
from maeday_jax.data.images import IMAGE_SUFFIXES  # the suffixes the dataset builders read
from maeday_jax.data.pipeline import shard_bounds

log = logging.getLogger("maeday_jax")

MANIFEST_SUFFIXES = (".txt", ".csv")
UNKNOWN_LABEL = -1


def is_image_name(name: str) -> bool:
  """Whether a file name has an image suffix (any case)."""
  return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Fingerprint:
  """What identifies a listing: how many names and the SHA-256 of the sorted names."""

  count: int
  sha256: str

  @classmethod
  def of(cls, files: Sequence[str]) -> Fingerprint:
    digest = hashlib.sha256()
    for name in files:
      digest.update(name.encode("utf-8", "surrogateescape"))
      digest.update(b"\n")
    return cls(len(files), digest.hexdigest())

  @classmethod
  def from_dict(cls, payload: dict) -> Fingerprint:
    return cls(int(payload["count"]), str(payload["sha256"]))

  def to_dict(self) -> dict:
    return {"count": self.count, "sha256": self.sha256}

  def describe(self) -> str:
    return f"{self.count} files (sha256 {self.sha256[:12]})"


@dataclasses.dataclass(frozen=True)
class Shard:
  """Process `index` of `count` scores the listing's entries [start, stop)."""

  index: int
  count: int
  start: int
  stop: int

  def __len__(self) -> int:
    return self.stop - self.start


@dataclasses.dataclass(frozen=True)
class Listing:
  """The sorted images of a source.

  Attributes:
    source: `data.path` as given.
    kind: 'folder', 'glob' or 'manifest'.
    files: each image's name as listed (see the module docstring), sorted, unique.
    paths: the path each image is read from (same order).
    labels: each image's label (-1 unknown) when a CSV manifest has a `label` column.
    masks: each image's mask path ('' none) when a CSV manifest has a `mask` column.
    skipped: (name, reason) of entries that could not be listed (broken links, loops).
    duplicates: names listed more than once (each is scored once).
    fingerprint: `Fingerprint.of(files)`.
  """

  source: str
  kind: str
  files: list[str]
  paths: list[str]
  labels: list[int] | None
  masks: list[str] | None
  skipped: list[tuple[str, str]]
  duplicates: int
  fingerprint: Fingerprint

  def __len__(self) -> int:
    return len(self.files)

  def shard(self, index: int | None = None, count: int | None = None) -> Shard:
    """The contiguous, balanced shard of process `index` of `count` (default: this one)."""
    if index is None or count is None:
      import jax  # Only for the defaults: listing needs no JAX.

      index = jax.process_index() if index is None else index
      count = jax.process_count() if count is None else count
    start, stop = shard_bounds(len(self), index, count)
    return Shard(index, count, start, stop)


def _list_folder(root: str) -> tuple[list[str], list[str], list[tuple[str, str]]]:
  """(names, paths, skipped) of the image files under `root`, with os.scandir only."""
  names, paths, skipped = [], [], []
  real_root = os.path.realpath(root)
  visited = {real_root}
  # (folder to open, its name relative to root, its real path).
  stack = [(root, "", real_root)]
  while stack:
    folder, relative, real = stack.pop()
    try:
      entries = list(os.scandir(folder))
    except OSError as e:
      skipped.append((relative or ".", f"cannot list folder ({e.strerror or e})"))
      continue
    for entry in entries:
      if entry.name.startswith("."):
        continue
      name = f"{relative}/{entry.name}" if relative else entry.name
      try:
        is_dir = entry.is_dir()  # Follows links; d_type only for the others.
        if is_dir:
          if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if target in visited or real_root.startswith(target + os.sep):
              skipped.append((name, f"link to a folder already listed ({target})"))
              continue
          else:
            target = os.path.join(real, entry.name)
          visited.add(target)
          stack.append((entry.path, name, target))
        elif is_image_name(entry.name):
          if entry.is_file():
            names.append(name)
            paths.append(entry.path)
          elif entry.is_symlink():
            skipped.append((name, "broken symbolic link"))
      except OSError as e:
        skipped.append((name, f"cannot list ({e.strerror or e})"))
  return names, paths, skipped


def _list_glob(pattern: str) -> tuple[list[str], list[str]]:
  matches = [m for m in glob.iglob(os.path.expanduser(pattern), recursive=True)]
  matches = [m for m in matches if is_image_name(m)]
  return matches, list(matches)


def _parse_label(cell: str, manifest: str, line: int) -> int:
  cell = (cell or "").strip()
  if not cell:
    return UNKNOWN_LABEL
  try:
    return int(cell)
  except ValueError:
    raise ConfigError(
      f"--config.data.path: {manifest} line {line}: label {cell!r} is not an integer "
      "(use 0 normal, 1 anomalous, empty unknown)."
    ) from None


def _list_manifest(manifest: str):
  """(names, paths, labels or None, masks or None) of a .txt or .csv manifest."""
  folder = os.path.dirname(os.path.abspath(manifest))

  def resolve(path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(folder, path)

  names, labels, masks = [], None, None
  with open(manifest, newline="", encoding="utf-8") as f:
    if manifest.lower().endswith(".txt"):
      for line in f:
        line = line.strip()
        if line and not line.startswith("#"):
          names.append(line)
    else:
      reader = csv.DictReader(f)
      columns = [c.strip() for c in reader.fieldnames or []]
      reader.fieldnames = columns
      if "path" not in columns:
        raise ConfigError(
          f"--config.data.path: {manifest} has no 'path' column (its header is "
          f"{','.join(columns) or 'empty'}); expected path[,label][,mask]."
        )
      labels = [] if "label" in columns else None
      masks = [] if "mask" in columns else None
      for line, row in enumerate(reader, start=2):
        path = (row.get("path") or "").strip()
        if not path:
          continue
        names.append(path)
        if labels is not None:
          labels.append(_parse_label(row.get("label"), manifest, line))
        if masks is not None:
          mask = (row.get("mask") or "").strip()
          masks.append(resolve(mask) if mask else "")
  return names, [resolve(n) for n in names], labels, masks


def list_source(path: str) -> Listing:
  """Lists the images of `path` (a folder, a glob or a manifest; see the module docstring).

  Raises:
    ConfigError: `path` is none of these, a manifest is malformed, or nothing is listed.
  """
  if not path:
    raise ConfigError(
      "--config.data.path: empty; give a folder of images, a glob or a .txt/.csv manifest."
    )
  expanded = os.path.expanduser(path)
  labels = masks = None
  skipped: list[tuple[str, str]] = []
  if os.path.isdir(expanded):
    kind = "folder"
    names, paths, skipped = _list_folder(expanded)
  elif os.path.isfile(expanded) and expanded.lower().endswith(MANIFEST_SUFFIXES):
    kind = "manifest"
    names, paths, labels, masks = _list_manifest(expanded)
  elif glob.has_magic(expanded):
    kind = "glob"
    names, paths = _list_glob(expanded)
  else:
    raise ConfigError(
      f"--config.data.path: {path} is not a folder, a .txt/.csv manifest or a glob pattern."
    )
  order = sorted(range(len(names)), key=names.__getitem__)
  keep, previous = [], None
  for i in order:
    if names[i] != previous:
      keep.append(i)
      previous = names[i]
  duplicates = len(order) - len(keep)
  if duplicates:
    log.warning("%s lists %d names more than once; each is scored once.", path, duplicates)
  files = [names[i] for i in keep]
  if not files:
    raise ConfigError(f"--config.data.path: {path} lists no images.")
  return Listing(
    source=path,
    kind=kind,
    files=files,
    paths=[paths[i] for i in keep],
    labels=None if labels is None else [labels[i] for i in keep],
    masks=None if masks is None else [masks[i] for i in keep],
    skipped=sorted(skipped),
    duplicates=duplicates,
    fingerprint=Fingerprint.of(files),
  )

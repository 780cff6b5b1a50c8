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
  `#` ignored), or a `.csv` file with a header and the columns `path[,label]` (label: an
  integer, empty = -1 unknown). Both are UTF-8, with or without a byte-order mark (as
  spreadsheets save them); bytes that are not UTF-8 are kept as the file name's bytes.
  Relative paths are resolved against the manifest's folder; each image is named as the
  manifest writes it. A `mask` column with mask files is refused: bulk scoring computes
  image scores only (`configs/evaluate.py` gives pixel metrics).

The listing uses `os.scandir` only (no file is opened; a glob's or a manifest's files get
one `lstat` each, a folder's none), is sorted by name, and keeps each file once: names
are compared by their canonical path (`os.path.realpath`: `a/./x.png`, `a//x.png` and a
link to `a/x.png` are `a/x.png`), the first name in sorted order is kept (and shown in
every output) and the others are counted as duplicates. One file listed twice with two
different labels is refused. Process `i` of `n` scores the contiguous range
`data.pipeline.shard_bounds(N, i, n)`. The `Fingerprint` (count and SHA-256 of the sorted
names) tells a rerun whether the list changed.

Names that are not valid UTF-8 (bytes names on Linux) are kept as Python lists them
(lone surrogates, 'surrogateescape'), so that the file can be read; outputs write them
with `output_name` (`maeday_jax.data.names.to_text`: each undecodable byte as `\\xNN`).
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
from maeday_jax.data import names as file_names
from maeday_jax.data.images import IMAGE_SUFFIXES  # the suffixes the dataset builders read
from maeday_jax.data.pipeline import shard_bounds

log = logging.getLogger("maeday_jax")

MANIFEST_SUFFIXES = (".txt", ".csv")
UNKNOWN_LABEL = -1
DUPLICATE_EXAMPLES = 20  # Duplicates named in the listing (and summary.json); all counted.


def output_name(name: str) -> str:
  """A listed name as outputs write it: unchanged when valid UTF-8, else each undecodable
  byte as the four characters `\\xNN` (`data.names.to_text`, Python's backslashreplace)."""
  return file_names.to_text(name)


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
    skipped: (name, reason) of entries that could not be listed (broken links, loops).
    duplicates: entries dropped because they name a file listed already (the same name
      again, or another spelling of its path: `a/./x.png`, a link); each file is scored
      once, under the first name in sorted order.
    duplicate_examples: (dropped name, kept name) of the first `DUPLICATE_EXAMPLES`.
    fingerprint: `Fingerprint.of(files)`.
    base: the folder relative paths were looked up in (a manifest's folder, the listed
      folder; '' for a glob).
  """

  source: str
  kind: str
  files: list[str]
  paths: list[str]
  labels: list[int] | None
  skipped: list[tuple[str, str]]
  duplicates: int
  fingerprint: Fingerprint
  duplicate_examples: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  base: str = ""

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


def _list_folder(root: str) -> tuple[list[str], list[str], list[str], list[tuple[str, str]]]:
  """(names, paths, canonical paths, skipped) of the image files under `root`, with
  os.scandir only: a regular file's canonical path is its real folder's plus its name (no
  system call); only a link to a file is resolved."""
  names, paths, canonical, skipped = [], [], [], []
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
            link = entry.is_symlink()  # d_type: no system call.
            canonical.append(
              os.path.realpath(entry.path) if link else os.path.join(real, entry.name)
            )
          elif entry.is_symlink():
            skipped.append((name, "broken symbolic link"))
      except OSError as e:
        skipped.append((name, f"cannot list ({e.strerror or e})"))
  return names, paths, canonical, skipped


def canonical_paths(paths: Sequence[str]) -> list[str]:
  """Each path's `os.path.realpath`, with each distinct folder resolved once and one
  `lstat` per file (a link to a file is resolved; a missing file keeps its name)."""
  folders: dict[str, str] = {}
  canonical = []
  cwd = os.getcwd()
  for path in paths:
    head, tail = os.path.split(os.path.join(cwd, path))
    real = folders.get(head)
    if real is None:
      real = folders[head] = os.path.realpath(head)
    full = os.path.join(real, tail)
    canonical.append(os.path.realpath(full) if os.path.islink(full) else full)
  return canonical


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
  """(names, paths, labels or None) of a .txt or .csv manifest.

  Read as UTF-8 with an optional byte-order mark ('utf-8-sig': Excel and Notepad write
  one); bytes that are not UTF-8 become the file name's own bytes ('surrogateescape'), as
  `os.listdir` lists such names.

  Raises:
    ConfigError: no `path` column, a label that is not an integer, or mask files (bulk
      scoring does not use masks).
  """
  folder = os.path.dirname(os.path.abspath(manifest))

  def resolve(path: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(folder, path)

  names, labels = [], None
  with open(manifest, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
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
          f"{','.join(columns) or 'empty'}); expected path[,label]."
        )
      labels = [] if "label" in columns else None
      for line, row in enumerate(reader, start=2):
        mask = (row.get("mask") or "").strip()
        if mask:
          # Refused rather than ignored: a user who lists masks expects pixel metrics.
          raise ConfigError(
            f"--config.data.path: {manifest} line {line} gives a mask ({mask}): bulk "
            "scoring does not use masks; use configs/evaluate.py for pixel metrics, or "
            "drop the 'mask' column."
          )
        path = (row.get("path") or "").strip()
        if not path:
          continue
        names.append(path)
        if labels is not None:
          labels.append(_parse_label(row.get("label"), manifest, line))
  return names, [resolve(n) for n in names], labels, folder


def list_source(path: str) -> Listing:
  """Lists the images of `path` (a folder, a glob or a manifest; see the module docstring).

  Raises:
    ConfigError: `path` is none of these, a manifest is malformed (or gives masks, or one
      file twice with different labels), or nothing is listed.
  """
  if not path:
    raise ConfigError(
      "--config.data.path: empty; give a folder of images, a glob or a .txt/.csv manifest."
    )
  expanded = os.path.expanduser(path)
  labels = None
  skipped: list[tuple[str, str]] = []
  if os.path.isdir(expanded):
    kind, base = "folder", os.path.abspath(expanded)
    names, paths, canonical, skipped = _list_folder(expanded)
  elif os.path.isfile(expanded) and expanded.lower().endswith(MANIFEST_SUFFIXES):
    kind = "manifest"
    names, paths, labels, base = _list_manifest(expanded)
    canonical = canonical_paths(paths)
  elif glob.has_magic(expanded):
    kind, base = "glob", ""
    names, paths = _list_glob(expanded)
    canonical = canonical_paths(paths)
  else:
    raise ConfigError(
      f"--config.data.path: {path} is not a folder, a .txt/.csv manifest or a glob pattern."
    )
  order = sorted(range(len(names)), key=names.__getitem__)
  keep: list[int] = []
  first: dict[str, int] = {}  # Canonical path -> the entry kept for it.
  examples: list[tuple[str, str]] = []
  for i in order:
    kept = first.setdefault(canonical[i], i)
    if kept == i:
      keep.append(i)
      continue
    if labels is not None and labels[i] != labels[kept]:
      raise ConfigError(
        f"--config.data.path: {path} lists one file twice with different labels: "
        f"{output_name(names[kept])} (label {labels[kept]}) and {output_name(names[i])} "
        f"(label {labels[i]}) are both {output_name(canonical[i])}; keep one."
      )
    if len(examples) < DUPLICATE_EXAMPLES:
      examples.append((names[i], names[kept]))
  duplicates = len(order) - len(keep)
  if duplicates:
    shown = ", ".join(
      f"{output_name(a)} (= {output_name(b)})" if a != b else output_name(a)
      for a, b in examples[:3]
    )
    log.warning(
      "%s lists %d file(s) more than once (%s%s); each file is scored once, under its "
      "first name in sorted order.",
      path,
      duplicates,
      shown,
      ", ..." if duplicates > 3 else "",
    )
  files = [names[i] for i in keep]
  if not files:
    raise ConfigError(f"--config.data.path: {path} lists no images.")
  return Listing(
    source=path,
    kind=kind,
    files=files,
    paths=[paths[i] for i in keep],
    labels=None if labels is None else [labels[i] for i in keep],
    skipped=sorted(skipped),
    duplicates=duplicates,
    fingerprint=Fingerprint.of(files),
    duplicate_examples=examples,
    base=base,
  )

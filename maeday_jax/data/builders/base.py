"""What every builder shares: the features, the example records and the skip report.

Images are stored as their original encoded file bytes (decoded with Pillow when read),
masks as a PNG of the binarised mask, or empty bytes for an all-zero mask. No tfds
feature that needs TensorFlow to encode or decode is used, so building and reading work
with TensorFlow absent.

A subclass lists what to store (`_plan`); the base decodes every image and mask once to
validate it, skips what is unreadable or inconsistent, logs each skipped file by path with
the reason, and keeps the list in the dataset's metadata (`metadata.json` beside the
array_record files) so it is still known when the prepared data is reused. The
metadata also lists the file names in record order and, per split, how many images whose
label comes from a mask had none (`unmasked`; they are stored as normal, label 0).

Folders are listed with `scan`: symbolic links to files are read like the files they
point to, a broken link is reported ("broken symbolic link") and skipped, and symbolic
links to folders are followed, each real folder once: a link back to a folder being
listed (a loop) or to one already listed is reported and not followed.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import hashlib
import inspect
import logging
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from maeday_jax.data import archives, images
from maeday_jax.data.errors import DataError, ImageTooLarge
from maeday_jax.data.names import to_text

logger = logging.getLogger(__name__)

GOOD = "good"
# File name suffixes tried as images; anything else in an image folder is reported.
IMAGE_SUFFIXES = images.IMAGE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class Item:
  """One file to store, as a builder's `_plan` lists it.

  Attributes:
    file_name: the relative path that identifies the example, unique within its split;
      stored as `names.to_text` of it (bytes that are not UTF-8 written `\\xNN`).
    image_path: the image file.
    mask_path: its mask file, None when there is none (the mask is then all zero).
    label: 0 good, 1 anomalous, -1 unknown; None derives it from the mask (1 when the
      mask has a non-zero pixel, else 0).
    defect_type: None derives 'good' / 'anomaly' / 'unknown' from the label.
    error: a reason to skip the file, found while listing (e.g. a missing mask).
  """

  file_name: str
  image_path: pathlib.Path
  mask_path: pathlib.Path | None = None
  label: int | None = 0
  defect_type: str | None = None
  error: str | None = None


def features() -> tfds.features.FeaturesDict:
  """The features of every dataset of this project."""
  return tfds.features.FeaturesDict(
    {
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes
      "mask": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG {0,1} or b""
      "label": tfds.features.Scalar(dtype=np.int64),
      "defect_type": tfds.features.Text(),
      "file_name": tfds.features.Text(),
    }
  )


def _defect_type_of(label: int) -> str:
  return {0: GOOD, 1: "anomaly"}.get(label, "unknown")


def make_example(item: Item) -> dict:
  """Reads and validates an item's files; returns the record to store.

  Raises:
    DataError: naming the file and the reason when the image or mask cannot be used.
  """
  if item.error:
    raise DataError.for_file(item.image_path, item.error)
  try:
    data = item.image_path.read_bytes()
  except OSError as e:
    reason = link_problem(item.image_path) or f"cannot read file ({e.strerror or e})"
    raise DataError.for_file(item.image_path, reason) from None
  image = images.decode_image(data, str(item.image_path))
  mask = None
  if item.mask_path is not None:
    if problem := link_problem(item.mask_path):
      raise DataError.for_file(item.mask_path, problem)
    mask = images.read_mask(item.mask_path, expected_hw=image.shape[:2])
  label = item.label
  if label is None:
    label = int(mask is not None and bool(mask.any()))
  return {
    "image": data,
    "mask": images.encode_png(mask) if mask is not None and mask.any() else b"",
    "label": label,
    "defect_type": item.defect_type or _defect_type_of(label),
    "file_name": item.file_name,
  }


def link_problem(path: pathlib.Path) -> str | None:
  """Why a symbolic link cannot be read (broken, or a loop); None when it can, or is no link."""
  if not path.is_symlink():
    return None
  try:
    path.stat()
  except OSError as e:
    if e.errno == errno.ELOOP:
      return "symbolic link loop (the link leads back to itself)"
    return f"broken symbolic link (its target {os.readlink(path)} {_missing(e)})"
  return None


def _missing(error: OSError) -> str:
  if error.errno in (errno.ENOENT, errno.ENOTDIR):
    return "does not exist"
  return f"cannot be read: {error.strerror or error}"


@dataclasses.dataclass
class Listing:
  """What `scan` found under a folder.

  Attributes:
    files: every file, sorted: regular files and symbolic links that are not to folders
      (broken links included, so that they are reported when read).
    skipped: (folder, reason) of every folder left out: a symbolic link loop, a second
      link to a folder already listed, a folder that cannot be listed.
  """

  files: list[pathlib.Path]
  skipped: list[tuple[pathlib.Path, str]]


def scan(directory: pathlib.Path, exclude: tuple[pathlib.Path | None, ...] = ()) -> Listing:
  """Lists the files under `directory` (recursively), hidden files and folders left out.

  Symbolic links to folders are followed; every real folder is listed once, so a link
  that leads back to a folder being listed (a loop) or to one listed already is put in
  `skipped` with the reason. Real folders are listed before the links: a link never
  takes a real sub-folder's place. Folders in `exclude`, and what lies under them
  (compared by real path), are left out silently.
  """
  files: list[pathlib.Path] = []
  skipped: list[tuple[pathlib.Path, str]] = []
  excluded = {os.path.realpath(e) for e in exclude if e is not None}
  visited = {os.path.realpath(directory): pathlib.Path(directory)}

  def not_listed(error: OSError) -> None:
    skipped.append((pathlib.Path(error.filename), f"cannot list folder ({error.strerror})"))

  def leave_out(path: pathlib.Path, real: str) -> bool:
    """Whether the folder at `path` (real path `real`) is not to be listed."""
    if any(os.path.commonpath([real, e]) == e for e in excluded):
      return True
    if real not in visited:
      return False
    first = visited[real]
    inside = os.path.realpath(path.parent)
    if os.path.commonpath([real, inside]) == real:
      skipped.append((path, f"symbolic link loop (leads back to {first}); not followed"))
    else:
      skipped.append((path, f"folder already listed as {first}; not followed twice"))
    return True

  def walk(top: pathlib.Path) -> list[pathlib.Path]:
    """Lists `top` without following links to folders; returns those links."""
    links = []
    for parent, dirs, names in os.walk(top, onerror=not_listed):
      kept = []
      for name in sorted(d for d in dirs if not d.startswith(".")):
        path = pathlib.Path(parent) / name
        if path.is_symlink():
          links.append(path)
        elif not leave_out(path, real := os.path.realpath(path)):
          visited[real] = path
          kept.append(name)
      dirs[:] = kept
      files.extend(pathlib.Path(parent) / f for f in names if not f.startswith("."))
    return links

  links = walk(pathlib.Path(directory))
  while links:
    link = links.pop(0)
    if not leave_out(link, real := os.path.realpath(link)):
      visited[real] = link
      links.extend(walk(link))
  return Listing(sorted(files), sorted(skipped))


def list_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The files under `directory` as `scan` lists them (skipped folders left out)."""
  return scan(directory).files


def files_in(directory: pathlib.Path) -> list[pathlib.Path]:
  """The files directly in `directory` as `scan` lists them (none when it does not exist)."""
  if not directory.is_dir():
    return []
  return [p for p in list_files(directory) if p.parent == directory]


def is_image_name(path: pathlib.Path) -> bool:
  """Whether the file name has an image suffix (any case)."""
  return path.suffix.lower() in IMAGE_SUFFIXES


def fingerprint(*directories: pathlib.Path | None) -> str:
  """A cheap digest of the files under folders, as `scan` lists them; contents are not read.

  Per file: its path inside the folder, size, modification time, inode change time and
  inode number (of the file a symbolic link points to). It changes when a file is added,
  removed, renamed, edited or replaced, even by one of the same size and modification
  time (`cp -p`, `touch -r`, a restored backup), so a prepared copy of a user's folder is
  rebuilt then. Broken links and skipped folders count by path and reason.
  """
  digest = hashlib.sha256()

  def add(text: str) -> None:
    # A name that is not valid UTF-8 (bytes on disk, surrogates here) counts by its bytes.
    digest.update(text.encode("utf-8", "surrogateescape"))

  for directory in directories:
    add(f"\0{directory}\0")
    if directory is None or not directory.is_dir():
      continue
    listing = scan(directory)
    for path in listing.files:
      relative = path.relative_to(directory)
      try:
        stat = path.stat()
      except OSError:
        add(f"{relative}|{link_problem(path) or 'unreadable'}\n")
        continue
      add(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}\n")
    for path, reason in listing.skipped:
      add(f"{path.relative_to(directory)}|skipped|{reason}\n")
  return digest.hexdigest()


def path_config_name(label: str, *paths: pathlib.Path | None) -> str:
  """A builder config name for path-defined data: readable slug + hash of the paths.

  Two different folders never share a cache entry, even when their names are equal.
  """
  slug = re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_").lower() or "data"
  key = "\0".join(str(p.resolve()) if p else "" for p in paths)
  digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
  return f"{slug[:40]}_{digest[:10]}"


class ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: image / mask / label / defect_type / file_name records.

  Subclasses implement `_plan` and set `DESCRIPTION`; `raw_path` is the user's raw copy
  (`config.data.path`); when it is not given, the tfds manual directory is used if set.
  Project builders are not registered in the global tfds registry; `prepare.py` holds
  the list.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  DESCRIPTION = ""
  HOMEPAGE = ""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path | None:
    """The builder's source file.

    tfds's own lookup imports `importlib_resources`, which tfds does not install on
    Python >= 3.9; the file is all tfds needs (to look for a checksums file beside it).
    """
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, raw_path: str | os.PathLike | None = None, **kwargs):
    self.raw_path = pathlib.Path(raw_path).expanduser() if raw_path else None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=features(),
      homepage=self.HOMEPAGE or None,
      # Examples keep the sorted order `_plan` gives: stable file order for outputs.
      disable_shuffling=True,
      metadata=tfds.core.MetadataDict(),
    )

  def source_fingerprint(self) -> str | None:
    """Digest of the raw files for path-defined data (rebuilt when it changes), else None."""
    return None

  def source_path(self, dl_manager: tfds.download.DownloadManager) -> pathlib.Path | None:
    """The raw copy: `raw_path`, else the tfds manual directory if one exists, else None."""
    if self.raw_path is not None:
      return self.raw_path
    try:
      return pathlib.Path(dl_manager.manual_dir)
    except (AssertionError, ValueError):  # No manual directory configured or it is empty.
      return None

  def required_source_path(
    self, dl_manager: tfds.download.DownloadManager, what: str
  ) -> pathlib.Path:
    """`source_path` for data only the user has; raises DataError asking for `what` if unset."""
    source = self.source_path(dl_manager)
    if source is None:
      raise DataError(f"config.data.path is empty: set it to {what}")
    return source

  def archive_root(
    self,
    dl_manager: tfds.download.DownloadManager,
    archive: archives.Archive,
    is_root: Callable[[pathlib.Path], bool],
    layout: str,
  ) -> pathlib.Path:
    """The root folder of a published dataset (`archives.locate`): from the raw copy
    (`source_path`), else from `archive` downloaded and extracted in tfds's download folder.
    """
    download_dir = pathlib.Path(dl_manager.download_dir)
    return archives.locate(
      self.source_path(dl_manager),
      archive,
      is_root,
      download_dir=download_dir,
      extract_dir=download_dir / "extracted",
      layout=layout,
    )

  @abc.abstractmethod
  def _plan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[Item]]:
    """Lists the items of every split, sorted; raises DataError for unusable sources."""

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    plan = self._plan(dl_manager)
    # The same dicts are filled while the splits are generated; tfds writes the metadata
    # after generation, so the lists are complete in metadata.json.
    self.info.metadata["skipped"] = {split: [] for split in plan}
    # File names in record order, so they can be listed without reading the records.
    self.info.metadata["file_names"] = {split: [] for split in plan}
    self.info.metadata["unmasked"] = {split: 0 for split in plan}
    # The fewest pixels of an image refused as larger than the pixel budget (0: none):
    # `prepare` rebuilds once the budget admits it.
    self.info.metadata["refused_pixels"] = 0
    if (digest := self.source_fingerprint()) is not None:
      self.info.metadata["fingerprint"] = digest
    return {split: self._generate_examples(split, items) for split, items in plan.items()}

  def _generate_examples(self, split: str, items: list[Item]) -> Iterator[tuple[str, dict]]:
    skipped = self.info.metadata["skipped"][split]
    file_names = self.info.metadata["file_names"][split]
    seen = set()
    for item in items:
      # Records, metadata and reports are UTF-8 text: a name that is not UTF-8 on disk
      # is kept as its lossless escape (`names.to_text`), never a UnicodeEncodeError.
      item = dataclasses.replace(item, file_name=to_text(item.file_name))
      if item.file_name in seen and not item.error:
        item = dataclasses.replace(item, error=f"listed twice as {item.file_name}")
      try:
        example = make_example(item)
      except DataError as e:
        # A problem with the mask names the mask in the reason; the path is the image's.
        reason = e.reason if e.path in (None, str(item.image_path)) else str(e)
        reason, path = to_text(reason), to_text(item.image_path)
        logger.warning("Skipping %s: %s", path, reason)
        skipped.append([path, reason])
        if isinstance(e, ImageTooLarge):
          refused = self.info.metadata["refused_pixels"]
          self.info.metadata["refused_pixels"] = min(refused or e.pixels, e.pixels)
        continue
      seen.add(item.file_name)
      file_names.append(item.file_name)
      if item.label is None and item.mask_path is None:
        self.info.metadata["unmasked"][split] += 1
      yield item.file_name, example
    if unmasked := self.info.metadata["unmasked"][split]:
      logger.info("%s %s: %d image(s) without a mask, labelled normal", self.name, split, unmasked)
    if skipped:
      logger.warning(
        "%s/%s %s: skipped %d file(s):\n%s",
        self.name,
        self.builder_config.name if self.builder_config else "",
        split,
        len(skipped),
        "\n".join(f"  {path}: {reason}" for path, reason in skipped),
      )

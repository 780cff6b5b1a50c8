"""From `config.data` to a prepared tfds builder: dataset names, categories, cache folder.

Prepared data lives in `config.data.data_dir` (default ~/.cache/maeday_jax/tfds) as
`<dataset>/<config>/<version>/` array_record files, where `<config>` is the category for
MVTec AD and VisA, and for `magnetic_tile` and `folder` the folder name plus a hash of the
resolved path(s). It is prepared once and reused; a new builder version is a new folder,
so it is rebuilt then; path-defined data is also rebuilt when the files change (a
fingerprint of names, sizes, modification and inode change times and inode numbers is
kept in the metadata), and when images refused as larger than the pixel budget
(`data.images`) fit the budget now in force. Downloads and extracted archives are kept in
`<data_dir>/downloads` (delete them once every category is prepared to save space).

Preparation holds an exclusive lock on `<dataset>/<config>/<version>.lock` (`fcntl.flock`,
where the platform has it): runs that share a `data_dir` and want the same data at once
wait for each other, and a run that waited reuses what the other prepared. Runs that
find the data ready do not wait. Within one multi-process JAX job, `split.load_split`
also lets process 0 prepare first, behind a barrier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
import pathlib
import shutil
from collections.abc import Iterator, Sequence

import ml_collections
import tensorflow_datasets as tfds

from maeday_jax.data import images
from maeday_jax.data.builders import (
  Btad,
  Folder,
  ImageBuilder,
  KolektorSdd2,
  MagneticTile,
  MvtecAd,
  Visa,
  btad,
  kolektorsdd2,
  magnetic_tile,
  mvtec_ad,
  visa,
)
from maeday_jax.data.builders import folder as folder_lib
from maeday_jax.data.errors import DataError

try:
  import fcntl
except ImportError:  # Not on Windows: preparation is not locked there.
  fcntl = None

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetKind:
  """A dataset this project reads.

  Attributes:
    builder: its tfds builder class.
    categories: its categories; None when one pseudo-category is defined by the path.
  """

  builder: type[ImageBuilder]
  categories: tuple[str, ...] | None


_KINDS = {
  "mvtec_ad": DatasetKind(MvtecAd, mvtec_ad.CATEGORIES),
  "visa": DatasetKind(Visa, visa.CATEGORIES),
  "magnetic_tile": DatasetKind(MagneticTile, None),
  "folder": DatasetKind(Folder, None),
  "btad": DatasetKind(Btad, btad.CATEGORIES),
  "kolektorsdd2": DatasetKind(KolektorSdd2, kolektorsdd2.CATEGORIES),
}
DATASETS = tuple(_KINDS)


def _did_you_mean(value: str, choices: Sequence[str]) -> str:
  close = difflib.get_close_matches(value, choices, n=1)
  return f" Did you mean '{close[0]}'?" if close else ""


def dataset_kind(data_config: ml_collections.ConfigDict) -> DatasetKind:
  """The dataset `config.data.name` selects; DataError listing the choices if unknown."""
  name = data_config.name
  if name not in _KINDS:
    raise DataError(
      f"Unknown dataset config.data.name='{name}'; choose one of {', '.join(DATASETS)}."
      + _did_you_mean(str(name), DATASETS)
    )
  return _KINDS[name]


def optional_path(value: str | None, field: str) -> pathlib.Path | None:
  """`config.data.<field>` as an expanded path, None when empty; DataError if missing."""
  if not value:
    return None
  path = pathlib.Path(str(value)).expanduser()
  if not path.exists():
    raise DataError(f"config.data.{field}={value} does not exist (check the spelling)")
  return path


def raw_path(data_config: ml_collections.ConfigDict) -> pathlib.Path | None:
  """`config.data.path`, required for path-defined datasets."""
  kind = dataset_kind(data_config)
  path = optional_path(data_config.path, "path")
  if path is None and kind.categories is None:
    raise DataError(
      f"config.data.path is empty: the {data_config.name} dataset is read from a folder; "
      "set config.data.path to it."
    )
  return path


def data_dir(data_config: ml_collections.ConfigDict) -> pathlib.Path:
  """The folder of the prepared array_record files (`config.data.data_dir`, expanded)."""
  return pathlib.Path(str(data_config.data_dir)).expanduser()


def valid_categories(data_config: ml_collections.ConfigDict) -> list[str]:
  """Every category of the selected dataset (one pseudo-category for path-defined data)."""
  kind = dataset_kind(data_config)
  if kind.categories is not None:
    return list(kind.categories)
  if data_config.name == "magnetic_tile":
    return [magnetic_tile.CATEGORY]
  return [folder_lib.category_name(raw_path(data_config))]


def resolve_categories(data_config: ml_collections.ConfigDict) -> list[str]:
  """The categories `config.data.categories` selects, in the dataset's order.

  'all' selects every category; a comma-separated string or a list selects some.
  `magnetic_tile` and `folder` have one pseudo-category: 'magnetic_tile' and the folder's
  name.

  Raises:
    DataError: naming an unknown category and listing the valid ones.
  """
  valid = valid_categories(data_config)
  requested = data_config.categories
  if isinstance(requested, str):
    requested = requested.split(",")
  requested = [str(c).strip() for c in (requested or [])]
  requested = [c for c in requested if c]
  if not requested:
    raise DataError(f"config.data.categories is empty; use 'all' or some of: {', '.join(valid)}")
  if requested == ["all"]:
    return valid
  for category in requested:
    if category not in valid:
      raise DataError(
        f"Unknown {data_config.name} category '{category}' in config.data.categories; "
        f"valid: all, {', '.join(valid)}." + _did_you_mean(category, valid)
      )
  return [c for c in valid if c in requested]


class _DropCustomConfigWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config() -> Iterator[None]:
  """Silences tfds's warning for configs outside BUILDER_CONFIGS, expected for paths."""
  absl_logger, drop = logging.getLogger("absl"), _DropCustomConfigWarning()
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


def make_builder(data_config: ml_collections.ConfigDict, category: str) -> ImageBuilder:
  """The tfds builder of one category (not prepared yet)."""
  kind = dataset_kind(data_config)
  valid = valid_categories(data_config)
  if category not in valid:
    raise DataError(
      f"Unknown {data_config.name} category '{category}'; valid: {', '.join(valid)}."
      + _did_you_mean(category, valid)
    )
  source = raw_path(data_config)
  common = {"data_dir": data_dir(data_config), "raw_path": source, "file_format": "array_record"}
  if data_config.name == "folder":
    normal = optional_path(data_config.get("normal_path"), "normal_path")
    masks = optional_path(data_config.get("mask_path"), "mask_path")
    with _quiet_custom_config():
      return Folder(config=Folder.config_for(source, normal, masks), **common)
  if data_config.name == "magnetic_tile":
    with _quiet_custom_config():
      return MagneticTile(config=MagneticTile.config_for(source), **common)
  for field in ("normal_path", "mask_path"):
    if data_config.get(field):
      logger.warning("config.data.%s is only read by the folder dataset; ignored", field)
  return kind.builder(config=category, **common)


def _stale_reason(builder: ImageBuilder) -> str | None:
  """Why prepared data must be rebuilt: path-defined data whose files changed, or images
  refused as larger than the pixel budget that the budget now admits; None when current."""
  expected = builder.source_fingerprint()
  if expected is not None and builder.info.metadata.get("fingerprint") != expected:
    return f"the files under {builder.raw_path} changed since they were prepared"
  refused = int(builder.info.metadata.get("refused_pixels") or 0)
  if refused and images.pixel_budget() >= refused:
    return (
      f"an image of {refused:,} pixels was refused as too large when it was prepared, and "
      f"the pixel budget is now {images.pixel_budget():,}"
    )
  return None


def _is_ready(builder: ImageBuilder) -> bool:
  """Whether the builder's data is prepared and current (`_stale_reason`)."""
  return builder.data_path.exists() and _stale_reason(builder) is None


@contextlib.contextmanager
def _locked(builder: ImageBuilder) -> Iterator[None]:
  """Holds the exclusive lock of the builder's prepared data, waiting for it if needed."""
  data_path = pathlib.Path(os.fspath(builder.data_path))
  lock_path = data_path.with_name(f"{data_path.name}.lock")
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "a") as lock:
    if fcntl is not None:
      try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        logger.info("Waiting for another run preparing %s (lock %s)", data_path, lock_path)
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      if fcntl is not None:
        fcntl.flock(lock, fcntl.LOCK_UN)


def _remove(data_path: pathlib.Path) -> None:
  """Removes prepared data; renamed first, so that other runs see it whole or not at all."""
  doomed = data_path.with_name(f"{data_path.name}.stale.{os.getpid()}")
  try:
    data_path.rename(doomed)
  except OSError:
    doomed = data_path
  shutil.rmtree(doomed, ignore_errors=doomed != data_path)


def _nothing_usable(builder: ImageBuilder) -> DataError:
  """The error of a split whose every file was skipped, listing them with the reasons."""
  metadata = builder.info.metadata
  kept = metadata.get("file_names", {})
  empty = [split for split, names in kept.items() if not names] or ["?"]
  skipped = metadata.get("skipped", {}).get(empty[0], [])
  shown = "".join(f"\n  {path}: {reason}" for path, reason in skipped[:10])
  more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
  where = builder.raw_path or builder.name
  return DataError(
    f"{where}: no usable image in the '{empty[0]}' split: all {len(skipped)} file(s) "
    f"were skipped:{shown}{more}"
  )


def prepare(data_config: ml_collections.ConfigDict, category: str) -> ImageBuilder:
  """Returns the builder of one category with its data prepared (built now if needed).

  Safe when several runs prepare the same data at once (see the module docstring).
  """
  builder = make_builder(data_config, category)
  if _is_ready(builder):
    return builder
  with _locked(builder):
    # Another run may have prepared it while this one waited for the lock.
    builder = make_builder(data_config, category)
    if _is_ready(builder):
      return builder
    if builder.data_path.exists():
      logger.info("Rebuilding %s: %s", builder.data_path, _stale_reason(builder))
      # A builder whose info was read from disk cannot regenerate it: remove, start afresh.
      _remove(pathlib.Path(os.fspath(builder.data_path)))
      builder = make_builder(data_config, category)
    source = builder.raw_path
    download_config = tfds.download.DownloadConfig(
      manual_dir=str(source) if source is not None and source.is_dir() else None,
      compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    try:
      builder.download_and_prepare(file_format="array_record", download_config=download_config)
    except AssertionError as e:  # tfds's words for a split whose every file was skipped.
      if "No examples were yielded" not in str(e):
        raise
      raise _nothing_usable(builder) from None
  # A fresh builder reads back what was written, metadata included.
  return make_builder(data_config, category)

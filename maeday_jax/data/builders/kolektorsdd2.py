"""KolektorSDD2 (Bozic et al., 2021): surface defects on electrical commutators.

Layout: `<root>/train/<stem>.png` with its ground truth `<stem>_GT.png` beside it, and
`<root>/test/` the same (any image suffix is read; the ground truth is paired by stem).
An image is anomalous when its ground-truth mask has a non-zero pixel, else normal; a
missing ground truth is a skipped, reported file (`base.make_example` raises a DataError
naming it), as is a ground truth without its image. `file_name` is the path inside the
root, e.g. `test/20001.png`; `defect_type` is 'good' or 'anomaly'. One category,
`kolektorsdd2` (one tfds builder config).

Splits, as in the other builders, whose `train` split holds normal images only (MVTec AD
`train/good`, VisA's 1-class split, magnetic tile `MT_Free`):
- `train`: the normal images of the official train split. Its defective images (246 of
  2331 in the paper's counts) are left out: training here is on normal images only. They
  are not reported as skipped (nothing is wrong with them); their file names are kept in
  the metadata (`train_anomalies_left_out`) and their number is logged.
- `test`: every image of the official test split (normal and defective).
An unreadable ground truth of a train image keeps the image in `train`, where it is then
skipped with the reason when the split is prepared.

The raw copy (`config.data.path`) is the extracted archive, or a folder at most two
levels above it. The archive is not downloaded nor extracted here: it is a zip with no
published SHA-256 (and a download page rather than a file link), and this project's
archive handling (`maeday_jax.data.archives`) verifies a published SHA-256 and extracts
tar files only. Like MVTec AD, it is prepared once (`<data_dir>/kolektorsdd2/kolektorsdd2`)
and reused.
"""

from __future__ import annotations

import logging
import os
import pathlib

import tensorflow_datasets as tfds

from maeday_jax import categories
from maeday_jax.data import archives, images, names
from maeday_jax.data.builders import base
from maeday_jax.data.errors import DataError

logger = logging.getLogger(__name__)

CATEGORIES = categories.KOLEKTORSDD2_CATEGORIES  # One: ("kolektorsdd2",).
CATEGORY = CATEGORIES[0]
SPLITS = ("train", "test")
GT_SUFFIX = "_GT"

URL = "https://go.vicos.si/kolektorsdd2"
# No SHA-256 of KolektorSDD2.zip is published; none is recorded (and none must be made up).
SHA256 = None
FILE_NAME = "KolektorSDD2.zip"
LAYOUT = "train/<name>.png + train/<name>_GT.png, test/ the same"
INSTRUCTIONS = (
  f"Download KolektorSDD2 ({FILE_NAME}, from {URL}), extract it (e.g. `unzip "
  f"{FILE_NAME}`) and set config.data.path to the extracted folder (the one holding "
  "train/ and test/), or to a folder at most two levels above it."
)


def is_root(directory: pathlib.Path) -> bool:
  """Whether `directory` holds `train/` and `test/`, with a ground-truth mask in `train/`."""
  if not ((directory / "test").is_dir() and (directory / "train").is_dir()):
    return False
  try:
    with os.scandir(directory / "train") as entries:
      return any(pathlib.Path(e.name).stem.endswith(GT_SUFFIX) for e in entries)
  except OSError:
    return False


def find_root(path: pathlib.Path) -> pathlib.Path:
  """The folder holding `train/` and `test/`, at or at most two levels below `path`."""
  return archives.extracted_root(path, is_root, "KolektorSDD2", LAYOUT, INSTRUCTIONS)


def is_mask_name(path: pathlib.Path) -> bool:
  """Whether the file is a ground-truth mask (`<stem>_GT.<image suffix>`)."""
  return base.is_image_name(path) and path.stem.endswith(GT_SUFFIX)


def plan_split(root: pathlib.Path, split: str) -> list[base.Item]:
  """The items of one official split (label None: derived from the mask), sorted."""
  folder = root / split
  files = base.files_in(folder)
  masks: dict[str, list[pathlib.Path]] = {}
  for path in files:
    if is_mask_name(path):
      masks.setdefault(path.stem.removesuffix(GT_SUFFIX), []).append(path)
  items, stems = [], set()
  for path in files:
    file_name = str(path.relative_to(root))
    if is_mask_name(path):
      continue
    if not base.is_image_name(path):
      items.append(base.Item(file_name, path, error="not an image file (unexpected suffix)"))
      continue
    stems.add(path.stem)
    found = masks.get(path.stem, [])
    error = None
    if not found:
      error = f"image without its ground-truth mask (expected {folder / path.stem}{GT_SUFFIX}.png)"
    elif len(found) > 1:
      error = f"more than one ground-truth mask: {', '.join(str(m) for m in found)}"
    mask = found[0] if len(found) == 1 else None
    items.append(base.Item(file_name, path, mask, label=None, error=error))
  for stem, paths in masks.items():
    if stem not in stems:
      items += [
        base.Item(str(p.relative_to(root)), p, error="ground-truth mask without its image")
        for p in paths
      ]
  return sorted(items, key=lambda i: i.file_name)


def is_defective(item: base.Item) -> bool:
  """Whether the item's mask has a non-zero pixel (False when it cannot be read: the
  item is then kept, and skipped with the reason when prepared)."""
  if item.error or item.mask_path is None:
    return False
  try:
    return bool(images.read_mask(item.mask_path).any())
  except (DataError, OSError):
    return False


class KolektorSdd2(base.ImageBuilder):
  """KolektorSDD2 with the split described in the module docstring (one config)."""

  name = "kolektorsdd2"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=CATEGORY, description="KolektorSDD2")]
  DESCRIPTION = "KolektorSDD2: surface defects of electrical commutators, pixel masks."
  HOMEPAGE = URL
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _plan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[base.Item]]:
    source = self.source_path(dl_manager)
    if source is None:
      raise DataError(
        "config.data.path is empty: KolektorSDD2 is not downloaded automatically. " + INSTRUCTIONS
      )
    root = find_root(source)
    plan = {split: plan_split(root, split) for split in SPLITS}
    defective = [i for i in plan["train"] if is_defective(i)]
    left_out = {i.file_name for i in defective}
    plan["train"] = [i for i in plan["train"] if i.file_name not in left_out]
    self.info.metadata["train_anomalies_left_out"] = sorted(names.to_text(n) for n in left_out)
    if defective:
      logger.info(
        "kolektorsdd2 train: %d defective image(s) left out (training is on normal images)",
        len(defective),
      )
    return plan

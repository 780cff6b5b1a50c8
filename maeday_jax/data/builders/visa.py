"""VisA (Zou et al., ECCV 2022): 12 categories, the official 1-class split.

The split comes from `split_csv/1cls.csv` (columns object, split, label, image, mask;
label 'normal' or 'anomaly'; paths relative to the dataset root). Masks: non-zero =
anomalous. `file_name` is the image path inside the category folder, e.g.
`Data/Images/Anomaly/000.JPG`; `defect_type` is 'good' or 'anomaly' (the 1-class split
has no finer defect types).

The raw copy (`config.data.path`) may be the extracted archive, the downloaded
`VisA_20220922.tar` or a folder holding it; without one, the public archive is
downloaded. Archives are checked against the published SHA-256 either way.
"""

from __future__ import annotations

import csv
import pathlib

import tensorflow_datasets as tfds

from maeday_jax import categories
from maeday_jax.data import archives
from maeday_jax.data.builders import base
from maeday_jax.data.errors import DataError

CATEGORIES = categories.VISA_CATEGORIES
SPLIT_CSV = "split_csv/1cls.csv"
_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}

ARCHIVE = archives.Archive(
  title="VisA",
  url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
  sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
  file_name="VisA_20220922.tar",
  homepage="https://github.com/amazon-science/spot-diff",
)
LAYOUT = f"{SPLIT_CSV} and <category>/Data/Images, <category>/Data/Masks"


def is_root(directory: pathlib.Path) -> bool:
  """Whether `directory` is the VisA root (it holds the official split file)."""
  return (directory / SPLIT_CSV).is_file()


def read_split_csv(path: pathlib.Path) -> list[dict[str, str]]:
  """Reads the official split file; raises DataError when columns are missing."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise DataError.for_file(path, f"missing column(s) {', '.join(missing)}")
    return [{k: (v or "").strip() for k, v in row.items() if k} for row in reader]


def _item(root: pathlib.Path, category: str, row: dict[str, str]) -> base.Item:
  image = root / row["image"]
  file_name = row["image"].removeprefix(f"{category}/")
  label = _LABELS.get(row["label"].lower())
  if label is None:
    return base.Item(file_name, image, error=f"unknown label '{row['label']}' in {SPLIT_CSV}")
  if label == 0:
    return base.Item(file_name, image, label=0, defect_type=base.GOOD)
  mask = root / row["mask"] if row["mask"] else None
  error = None
  if mask is None or not mask.is_file():
    error = f"defect image without a mask (expected {mask or 'a mask in ' + SPLIT_CSV})"
  return base.Item(file_name, image, mask, label=1, defect_type="anomaly", error=error)


class Visa(base.ImageBuilder):
  """VisA with the official 1-class split, one config per category."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c, description=f"VisA {c}") for c in CATEGORIES]
  DESCRIPTION = "VisA: visual anomaly detection, 12 categories, official 1-class split."
  HOMEPAGE = ARCHIVE.homepage
  MANUAL_DOWNLOAD_INSTRUCTIONS = ARCHIVE.manual_instructions()

  def _plan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[base.Item]]:
    category = self.builder_config.name
    root = self.archive_root(dl_manager, ARCHIVE, is_root, LAYOUT)
    rows = [r for r in read_split_csv(root / SPLIT_CSV) if r["object"] == category]
    if not rows:
      raise DataError(f"{root / SPLIT_CSV}: no rows for the VisA category '{category}'")
    splits: dict[str, list[base.Item]] = {"train": [], "test": []}
    for row in rows:
      item = _item(root, category, row)
      if row["split"] not in splits:
        item = base.Item(item.file_name, item.image_path, error=f"unknown split '{row['split']}'")
      splits.get(row["split"], splits["test"]).append(item)
    return {split: sorted(items, key=lambda i: i.file_name) for split, items in splits.items()}

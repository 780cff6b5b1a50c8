"""MVTec AD (Bergmann et al., CVPR 2019): 15 categories, one tfds builder config each.

Layout: `<cat>/train/good/*.png`, `<cat>/test/<defect|good>/*.png`,
`<cat>/ground_truth/<defect>/<name>_mask.png`. Splits: `train` (good images only) and
`test` (good and defective). `file_name` is the path inside the category folder, e.g.
`test/broken_large/000.png`; `defect_type` is the test sub-folder ('good' for normal).

The raw copy (`config.data.path`) may be the extracted archive, the downloaded
`mvtec_anomaly_detection.tar.xz` or a folder holding it; without one, the public archive
is downloaded into the tfds download folder. Archives are checked against the published
SHA-256 either way; an extracted copy (a folder has no checksum) is checked for the
category's layout.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from maeday_jax import categories
from maeday_jax.data import archives
from maeday_jax.data.builders import base
from maeday_jax.data.errors import DataError

OBJECTS, TEXTURES = categories.MVTEC_OBJECTS, categories.MVTEC_TEXTURES
CATEGORIES = categories.MVTEC_CATEGORIES

ARCHIVE = archives.Archive(
  title="MVTec AD",
  url=(
    "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
    "420938113-1629960298/mvtec_anomaly_detection.tar.xz"
  ),
  sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
  file_name="mvtec_anomaly_detection.tar.xz",
  homepage="https://www.mvtec.com/company/research/datasets/mvtec-ad",
)
LAYOUT = "<category>/train/good/*.png, <category>/test/<defect>/*.png, <category>/ground_truth"


def is_root(directory: pathlib.Path) -> bool:
  """Whether `directory` holds at least one MVTec AD category folder."""
  return any((directory / c / "train").is_dir() for c in CATEGORIES)


def _images(directory: pathlib.Path, category_dir: pathlib.Path) -> tuple[list, list]:
  """Image files of a folder, and items for the files that are not images."""
  files = [p for p in base.list_files(directory) if p.parent == directory]
  odd = [
    base.Item(str(p.relative_to(category_dir)), p, error="not an image file (unexpected suffix)")
    for p in files
    if not base.is_image_name(p)
  ]
  return [p for p in files if base.is_image_name(p)], odd


class MvtecAd(base.ImageBuilder):
  """MVTec AD, one config per category."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=c, description=f"MVTec AD category {c}") for c in CATEGORIES
  ]
  DESCRIPTION = "MVTec AD: industrial anomaly detection, 15 object and texture categories."
  HOMEPAGE = ARCHIVE.homepage
  MANUAL_DOWNLOAD_INSTRUCTIONS = ARCHIVE.manual_instructions()

  def _plan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[base.Item]]:
    root = self.archive_root(dl_manager, ARCHIVE, is_root, LAYOUT)
    category = self.builder_config.name
    category_dir = root / category
    missing = [d for d in ("train/good", "test") if not (category_dir / d).is_dir()]
    if missing:
      found = sorted(c for c in CATEGORIES if (root / c).is_dir())
      raise DataError(
        f"{category_dir}: the MVTec AD category '{category}' is missing or incomplete "
        f"(no {', '.join(missing)}); categories found in {root}: {', '.join(found) or 'none'}"
      )

    train_files, train_odd = _images(category_dir / "train" / "good", category_dir)
    train = train_odd + [
      base.Item(str(p.relative_to(category_dir)), p, label=0, defect_type=base.GOOD)
      for p in train_files
    ]
    test = []
    for defect_dir in sorted(p for p in (category_dir / "test").iterdir() if p.is_dir()):
      defect = defect_dir.name
      files, odd = _images(defect_dir, category_dir)
      test += odd
      for path in files:
        file_name = str(path.relative_to(category_dir))
        if defect == base.GOOD:
          test.append(base.Item(file_name, path, label=0, defect_type=base.GOOD))
          continue
        mask = category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
        error = None if mask.is_file() else f"defect image without a mask (expected {mask})"
        test.append(base.Item(file_name, path, mask, label=1, defect_type=defect, error=error))
    return {"train": sorted(train, key=_key), "test": sorted(test, key=_key)}


def _key(item: base.Item) -> str:
  return item.file_name

"""BTAD, the beanTech Anomaly Detection dataset (Mishra et al., 2021): 3 products.

Layout: `<product>/train/ok/*`, `<product>/test/ok/*`, `<product>/test/ko/*` and the
masks of the `ko` images in `<product>/ground_truth/ko/`, for the products `01`, `02`
and `03` (one tfds builder config each). Image and mask formats differ per product
(01: BMP images, PNG masks; 02: PNG and PNG; 03: BMP and BMP), so any image suffix is
read and a mask is paired with its image by the file name stem (`0003.bmp` <->
`0003.png`). Splits: `train` (the `train/ok` images, all normal) and `test` (`ok`
normal, `ko` anomalous). `file_name` is the path inside the product folder, e.g.
`test/ko/0003.bmp`; `defect_type` is 'good' or 'anomaly' (BTAD has no finer types).

A `ko` image without a mask, or with more than one mask of its stem, is skipped and
reported with the reason (`base.make_example` raises a DataError naming the file, as for
MVTec AD); so is a mask without its image.

The raw copy (`config.data.path`) is the extracted archive, or a folder at most two
levels above it (the zip extracts to `BTech_Dataset_transformed/`). The archive is not
downloaded nor extracted here: it is a zip with no published SHA-256, and this project's
archive handling (`maeday_jax.data.archives`) verifies a published SHA-256 and extracts
tar files only. Like MVTec AD, a product is prepared once (`<data_dir>/btad/<product>`)
and reused.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from maeday_jax import categories
from maeday_jax.data import archives
from maeday_jax.data.builders import base
from maeday_jax.data.errors import DataError

CATEGORIES = categories.BTAD_CATEGORIES
NORMAL, ANOMALOUS = "ok", "ko"

URL = "https://avires.dimi.uniud.it/papers/btad/btad.zip"
# No SHA-256 of btad.zip is published; none is recorded (and none must be made up).
SHA256 = None
FILE_NAME = "btad.zip"
LAYOUT = "<product>/train/ok, <product>/test/{ok,ko}, <product>/ground_truth/ko"
INSTRUCTIONS = (
  f"Download BTAD ({URL}), extract {FILE_NAME} (e.g. `unzip {FILE_NAME}`) and set "
  "config.data.path to the extracted folder (the one holding the product folders "
  f"{', '.join(CATEGORIES)}), or to a folder at most two levels above it."
)


def is_root(directory: pathlib.Path) -> bool:
  """Whether `directory` holds at least one BTAD product folder."""
  return any((directory / c / "train" / NORMAL).is_dir() for c in CATEGORIES)


def find_root(path: pathlib.Path) -> pathlib.Path:
  """The folder holding the product folders, at or at most two levels below `path`."""
  return archives.extracted_root(path, is_root, "BTAD", LAYOUT, INSTRUCTIONS)


def _masks_by_stem(directory: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """The image files of a mask folder by file name stem (non-images are ignored)."""
  masks: dict[str, list[pathlib.Path]] = {}
  for path in base.files_in(directory):
    if base.is_image_name(path):
      masks.setdefault(path.stem, []).append(path)
  return masks


def plan_product(product_dir: pathlib.Path) -> dict[str, list[base.Item]]:
  """The items of one product folder's splits, sorted by file name."""

  def item(path: pathlib.Path, **fields) -> base.Item:
    return base.Item(str(path.relative_to(product_dir)), path, **fields)

  def not_image(path: pathlib.Path) -> base.Item:
    return item(path, error="not an image file (unexpected suffix)")

  train = [
    item(p, label=0, defect_type=base.GOOD) if base.is_image_name(p) else not_image(p)
    for p in base.files_in(product_dir / "train" / NORMAL)
  ]
  test = [
    item(p, label=0, defect_type=base.GOOD) if base.is_image_name(p) else not_image(p)
    for p in base.files_in(product_dir / "test" / NORMAL)
  ]
  mask_dir = product_dir / "ground_truth" / ANOMALOUS
  masks = _masks_by_stem(mask_dir)
  stems = set()
  for path in base.files_in(product_dir / "test" / ANOMALOUS):
    if not base.is_image_name(path):
      test.append(not_image(path))
      continue
    stems.add(path.stem)
    found = masks.get(path.stem, [])
    error = None
    if not found:
      error = f"defect image without a mask (expected {mask_dir / path.stem}.<png|bmp|...>)"
    elif len(found) > 1:
      error = f"more than one mask for this image: {', '.join(str(m) for m in found)}"
    mask = found[0] if len(found) == 1 else None
    test.append(item(path, mask_path=mask, label=1, defect_type="anomaly", error=error))
  for stem, paths in masks.items():
    if stem not in stems:
      test += [item(p, error="mask without its image in test/ko") for p in paths]
  return {"train": sorted(train, key=_key), "test": sorted(test, key=_key)}


def _key(item: base.Item) -> str:
  return item.file_name


class Btad(base.ImageBuilder):
  """BTAD, one config per product (`01`, `02`, `03`)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name=c, description=f"BTAD product {c}") for c in CATEGORIES
  ]
  DESCRIPTION = "BTAD: beanTech anomaly detection, 3 industrial products, pixel masks."
  HOMEPAGE = URL  # The download link the authors publish.
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _plan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[base.Item]]:
    source = self.source_path(dl_manager)
    if source is None:
      raise DataError(
        "config.data.path is empty: BTAD is not downloaded automatically. " + INSTRUCTIONS
      )
    root = find_root(source)
    product = self.builder_config.name
    product_dir = root / product
    missing = [d for d in (f"train/{NORMAL}", "test") if not (product_dir / d).is_dir()]
    if missing:
      found = sorted(c for c in CATEGORIES if (root / c).is_dir())
      raise DataError(
        f"{product_dir}: the BTAD product '{product}' is missing or incomplete "
        f"(no {', '.join(missing)}); products found in {root}: {', '.join(found) or 'none'}"
      )
    return plan_product(product_dir)

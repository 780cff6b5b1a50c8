"""The practitioner's own data: a folder of images to score, optionally references and masks.

- `test`: every file under `config.data.path` (recursively; hidden files and the
  reference and mask folders, if nested inside, are left out). Files that are not
  readable images are reported and skipped.
- `train`: every file under `config.data.normal_path` (normal references, label 0); the
  split exists only when that folder is set.
- Masks, when `config.data.mask_path` is set, are paired by file name: the image
  `a/b.jpg` takes the mask `a/b.<any suffix>` or `a/b_mask.<any suffix>` under the mask
  folder (or, when masks are kept flat, the only mask named `b.*` / `b_mask.*`). The label
  is then 1 when the mask has a non-zero pixel and 0 otherwise (an image without a mask
  is normal). Without a mask folder the label is -1 (unknown).
- `file_name` is the path inside its folder; `defect_type` is 'good', 'anomaly' or
  'unknown' from the label.

The builder config is named after the folder and a hash of the three paths, so two
folders never share a cache entry; the prepared copy is rebuilt when the files change
(names, sizes, modification times) or the builder version changes.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib

import tensorflow_datasets as tfds

from maeday_jax.data.builders import base
from maeday_jax.data.errors import DataError


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
  """Builder config of a folder dataset.

  Attributes:
    normal_path: folder of normal reference images ('' for none).
    mask_path: folder of masks paired with the images by name ('' for none).
  """

  normal_path: str = ""
  mask_path: str = ""


def category_name(path: pathlib.Path) -> str:
  """The folder dataset's single pseudo-category: the folder's name."""
  return path.expanduser().resolve().name or "folder"


def _mask_key(relative: pathlib.PurePath) -> str:
  key = relative.with_suffix("").as_posix()
  return key.removesuffix("_mask")


def _under(path: pathlib.Path, folder: pathlib.Path | None) -> bool:
  return folder is not None and path.resolve().is_relative_to(folder.resolve())


class MaskIndex:
  """Finds the mask of an image by relative path, or by bare name when masks are flat."""

  def __init__(self, mask_dir: pathlib.Path):
    self.files = base.list_files(mask_dir)
    self.by_key = {_mask_key(p.relative_to(mask_dir)): p for p in self.files}
    by_stem = collections.defaultdict(list)
    for p in self.files:
      by_stem[p.stem.removesuffix("_mask")].append(p)
    self.by_stem = {stem: paths[0] for stem, paths in by_stem.items() if len(paths) == 1}
    self.used: set[pathlib.Path] = set()

  def find(self, relative: pathlib.Path) -> pathlib.Path | None:
    """The mask of the image at `relative` (inside the image folder), or None."""
    mask = self.by_key.get(_mask_key(relative)) or self.by_stem.get(relative.stem)
    if mask is not None:
      self.used.add(mask)
    return mask


def _list(folder: pathlib.Path, what: str, exclude: tuple) -> list[pathlib.Path]:
  if not folder.is_dir():
    raise DataError(f"{what}={folder} is not a folder")
  files = [p for p in base.list_files(folder) if not any(_under(p, e) for e in exclude)]
  if not files:
    raise DataError(f"{what}={folder} contains no files")
  return files


class Folder(base.ImageBuilder):
  """A user's folders of images, references and masks (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "A folder of images to score, with optional normal references and masks."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Set config.data.path to the folder of images to score."

  @classmethod
  def config_for(
    cls, path: pathlib.Path, normal_path: pathlib.Path | None, mask_path: pathlib.Path | None
  ) -> FolderConfig:
    """The builder config of the given folders (named after a hash of the paths)."""
    return FolderConfig(
      name=base.path_config_name(category_name(path), path, normal_path, mask_path),
      normal_path=str(normal_path or ""),
      mask_path=str(mask_path or ""),
    )

  def _optional(self, field: str) -> pathlib.Path | None:
    value = getattr(self.builder_config, field)
    return pathlib.Path(value) if value else None

  def source_fingerprint(self) -> str | None:
    normal, masks = self._optional("normal_path"), self._optional("mask_path")
    return base.fingerprint(self.raw_path, normal, masks)

  def _plan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[base.Item]]:
    source = self.source_path(dl_manager)
    if source is None:
      raise DataError("config.data.path is empty: set it to the folder of images to score")
    normal_dir, mask_dir = self._optional("normal_path"), self._optional("mask_path")
    images = _list(source, "config.data.path", (normal_dir, mask_dir))
    if mask_dir is not None and not mask_dir.is_dir():
      raise DataError(f"config.data.mask_path={mask_dir} is not a folder")
    masks = MaskIndex(mask_dir) if mask_dir is not None else None

    test = []
    for path in images:
      relative = path.relative_to(source)
      if masks is None:
        test.append(base.Item(str(relative), path, label=-1))
      else:
        test.append(base.Item(str(relative), path, masks.find(relative), label=None))
    if masks is not None:
      for orphan in sorted(set(masks.files) - masks.used):
        test.append(
          base.Item(f"<mask>/{orphan}", orphan, error="mask without a matching image (by name)")
        )
    splits = {"test": test}
    if normal_dir is not None:
      splits["train"] = [
        base.Item(str(p.relative_to(normal_dir)), p, label=0, defect_type=base.GOOD)
        for p in _list(normal_dir, "config.data.normal_path", ())
      ]
    return splits

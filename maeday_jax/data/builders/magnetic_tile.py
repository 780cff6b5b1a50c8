"""Magnetic tile defects (Huang et al., 2018): grayscale JPEG surfaces of varying size.

Layout: `<root>/MT_<Class>/Imgs/<name>.jpg` with its mask `<name>.png` (non-zero =
defect). `MT_Free` is normal; `MT_Blowhole`, `MT_Break`, `MT_Crack`, `MT_Fray` and
`MT_Uneven` are the defect classes; `defect_type` is the class in lower case without
the prefix ('good' for MT_Free); `file_name` is e.g. `MT_Crack/Imgs/exp1_num_4727.jpg`.

The dataset has no official split. This one is deterministic and does not depend on the
order files are listed in, nor change for a file when others are added:
- every image of a defect class goes to `test`;
- an `MT_Free` image goes to `train` when the SHA-256 of its file name (e.g.
  `exp0_num_743.jpg`), read as a big-endian integer, is even, else to `test`: about half
  the normal images are references, half are scored with the defects.
`MT_Free` masks are not read (normal images have an all-zero mask).

The data is defined by the user's folder (`config.data.path`), so the builder config is
named after a hash of that path, and the prepared copy is rebuilt when the folder's
files change (see `base.fingerprint`: names, sizes, modification and inode change times,
inode numbers) or the builder version changes.
"""

from __future__ import annotations

import hashlib
import pathlib

import tensorflow_datasets as tfds

from maeday_jax.data import archives
from maeday_jax.data.builders import base
from maeday_jax.data.errors import DataError

NORMAL_CLASS = "MT_Free"
DEFECT_CLASSES = ("MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
CLASSES = (NORMAL_CLASS, *DEFECT_CLASSES)
CATEGORY = "magnetic_tile"


def is_root(directory: pathlib.Path) -> bool:
  """Whether `directory` holds at least one `MT_<Class>/Imgs` folder."""
  return any((directory / c / "Imgs").is_dir() for c in CLASSES)


def is_train_normal(file_name: str) -> bool:
  """The split rule for MT_Free images: even SHA-256 of the bare file name -> train."""
  return int(hashlib.sha256(file_name.encode()).hexdigest(), 16) % 2 == 0


def find_root(path: pathlib.Path) -> pathlib.Path:
  """The folder holding the MT_<Class> folders, at or at most two levels below `path`."""
  if not path.is_dir():
    raise DataError(f"config.data.path={path} is not a folder (expected the MT dataset)")
  root = archives.find_root(path, is_root)
  if root is None:
    raise DataError(
      f"config.data.path={path} does not hold the magnetic tile layout "
      f"(<Class>/Imgs/<name>.jpg + <name>.png for classes {', '.join(CLASSES)})"
    )
  return root


def _class_items(root: pathlib.Path, cls: str) -> list[base.Item]:
  folder = root / cls / "Imgs"
  if not folder.is_dir():
    return []
  files = [p for p in base.list_files(folder) if p.parent == folder]
  names = {p.name for p in files}
  normal = cls == NORMAL_CLASS
  defect_type = base.GOOD if normal else cls.removeprefix("MT_").lower()
  items = []
  for path in files:
    file_name = str(path.relative_to(root))
    suffix = path.suffix.lower()
    if suffix == ".png":  # A mask; reported only when its image is missing.
      if not normal and not any(n.startswith(path.stem + ".") and n != path.name for n in names):
        items.append(base.Item(file_name, path, error="mask without its image"))
      continue
    if not base.is_image_name(path):
      items.append(base.Item(file_name, path, error="not an image file (unexpected suffix)"))
    elif normal:
      items.append(base.Item(file_name, path, label=0, defect_type=defect_type))
    else:
      mask = path.with_suffix(".png")
      error = None if mask.is_file() else f"defect image without a mask (expected {mask})"
      items.append(base.Item(file_name, path, mask, label=1, defect_type=defect_type, error=error))
  return items


class MagneticTile(base.ImageBuilder):
  """The magnetic tile defect dataset with the split described in the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION = "Magnetic tile surface defects: MT_Free normal, five defect classes."
  HOMEPAGE = "https://github.com/abin24/Magnetic-tile-defect-datasets."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Set config.data.path to the folder holding the MT_* folders."

  @classmethod
  def config_for(cls, raw_path: pathlib.Path) -> tfds.core.BuilderConfig:
    """The builder config of the data at `raw_path` (named after a hash of the path)."""
    return tfds.core.BuilderConfig(name=base.path_config_name(CATEGORY, raw_path))

  def source_fingerprint(self) -> str | None:
    return base.fingerprint(self.raw_path)

  def _plan(self, dl_manager: tfds.download.DownloadManager) -> dict[str, list[base.Item]]:
    root = find_root(self.required_source_path(dl_manager, "the magnetic tile dataset folder"))
    train, test = [], []
    for cls in CLASSES:
      for item in _class_items(root, cls):
        is_train = cls == NORMAL_CLASS and not item.error and is_train_normal(item.image_path.name)
        (train if is_train else test).append(item)
    return {"train": train, "test": test}

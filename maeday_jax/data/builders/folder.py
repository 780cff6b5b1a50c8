"""The practitioner's own data: a folder of images to score, optionally references and masks.

- `test`: every file under `config.data.path` (recursively; hidden files and the
  reference and mask folders, if nested inside, are left out). Files that are not
  readable images are reported and skipped.
- `train`: every file under `config.data.normal_path` (normal references, label 0); the
  split exists only when that folder is set.
- Masks, when `config.data.mask_path` is set, are paired by file name: the image
  `a/b.jpg` takes the mask `a/b.<any suffix>` or `a/b_mask.<any suffix>` under the mask
  folder. When the mask folder is flat (no sub-folders), an image in a sub-folder that
  has no mask at its own path takes the mask of its bare name `b.*` / `b_mask.*`. Each
  mask pairs with one image and each image with at most one mask: a mask that two images
  would share (e.g. `lineA/001.jpg` and `lineB/001.jpg` with a flat `001.png`) or an
  image with two masks is an error raised before anything is prepared, naming the
  files; mirror the image sub-folders in the mask folder to fix it. A mask that pairs
  with no image is reported and skipped.
- Labels with masks: 1 when the image's mask has a non-zero pixel, 0 when it is all
  zero. An image without a mask is normal (label 0, all-zero mask); how many there were
  is kept with the prepared data (`Split.unmasked`). Without a mask folder the label is
  -1 (unknown).
- `file_name` is the path inside its folder; `defect_type` is 'good', 'anomaly' or
  'unknown' from the label. A name that is not valid UTF-8 (bytes from an old NAS share
  or a camera card) is read and scored like any other; it is kept as UTF-8 text with
  each undecodable byte written `\\xNN` (`maeday_jax.data.names`), and outputs named
  after it (maps, overlays) get the original bytes back on disk.
- Symbolic links: a link to a file is read as that file and a broken link is reported
  ("broken symbolic link") and skipped. A link to a folder is followed, and its files
  are named by the path through the link; each real folder is listed once, so a link
  that leads back to a folder being listed (a loop), or to a folder listed already, is
  reported and not followed.

The builder config is named after the folder and a hash of the three paths, so two
folders never share a cache entry; the prepared copy is rebuilt when the files change
(see `base.fingerprint`: names, sizes, modification and inode change times, inode
numbers) or the builder version changes.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib

import tensorflow_datasets as tfds

from maeday_jax.data.builders import base
from maeday_jax.data.errors import DataError
from maeday_jax.data.names import to_text


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
  """The folder dataset's single pseudo-category: the folder's name (`names.to_text`)."""
  return to_text(path.expanduser().resolve().name) or "folder"


def _mask_key(relative: pathlib.PurePath) -> str:
  key = relative.with_suffix("").as_posix()
  return key.removesuffix("_mask")


class MaskIndex:
  """Finds the mask of an image by relative path, or by bare name when masks are flat."""

  def __init__(self, mask_dir: pathlib.Path, files: list[pathlib.Path]):
    self.mask_dir = mask_dir
    self.files = files
    self.flat = all(p.parent == mask_dir for p in files)
    by_key = collections.defaultdict(list)
    for p in files:
      by_key[_mask_key(p.relative_to(mask_dir))].append(p)
    self.by_key = dict(by_key)

  def find(self, relative: pathlib.Path) -> list[pathlib.Path]:
    """The masks of the image at `relative` (inside the image folder): one, none, or
    several when the pairing is ambiguous."""
    masks = self.by_key.get(_mask_key(relative))
    if masks is None and self.flat:
      masks = self.by_key.get(relative.stem)
    return masks or []


def _pair_masks(
  images: list[pathlib.Path], source: pathlib.Path, masks: MaskIndex
) -> dict[pathlib.Path, pathlib.Path | None]:
  """Each image's mask (None when it has none).

  Raises:
    DataError: naming the files, when an image matches several masks or a mask several
      images.
  """
  paired, users = {}, collections.defaultdict(list)
  problems = []
  for path in images:
    found = masks.find(path.relative_to(source))
    if len(found) > 1:
      problems.append(
        f"the image {path} matches {len(found)} masks ({', '.join(map(str, found))}); "
        "keep one of them"
      )
    paired[path] = found[0] if found else None
    if found:
      users[found[0]].append(path)
  for mask, shared in users.items():
    if len(shared) > 1:
      problems.append(
        f"the mask {mask} pairs with {len(shared)} images ({', '.join(map(str, shared))})"
      )
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise DataError(
      f"config.data.mask_path={masks.mask_dir}: ambiguous mask pairing:\n  {shown}{more}\n"
      "Each image pairs with at most one mask and each mask with one image. Masks in a "
      "flat mask folder pair by bare file name, so images of the same name in different "
      "sub-folders would share one: mirror the image sub-folders in the mask folder "
      "(e.g. <mask_path>/lineA/001.png for <path>/lineA/001.jpg). Images of one folder "
      "that differ only by suffix (001.jpg, 001.png) need distinct names."
    )
  return paired


def _list(folder: pathlib.Path, what: str, exclude: tuple) -> base.Listing:
  if not folder.is_dir():
    raise DataError(f"{what}={folder} is not a folder")
  listing = base.scan(folder, exclude)
  if not listing.files:
    raise DataError(f"{what}={folder} contains no files")
  return listing


def _skipped_items(listing: base.Listing, folder: pathlib.Path, prefix: str = ""):
  """Items reporting the folders the listing left out (loops, repeated links)."""
  return [
    base.Item(f"{prefix}{path.relative_to(folder)}", path, error=reason)
    for path, reason in listing.skipped
  ]


class Folder(base.ImageBuilder):
  """A user's folders of images, references and masks (see the module docstring)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Symbolic links to folders followed; ambiguous mask pairing refused; "
    "flat-mask pairing by bare name only when the mask folder is flat; images without "
    "a mask counted.",
  }
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
    source = self.required_source_path(dl_manager, "the folder of images to score")
    normal_dir, mask_dir = self._optional("normal_path"), self._optional("mask_path")
    listing = _list(source, "config.data.path", (normal_dir, mask_dir))
    if mask_dir is not None and not mask_dir.is_dir():
      raise DataError(f"config.data.mask_path={mask_dir} is not a folder")

    test = _skipped_items(listing, source)
    if mask_dir is None:
      test += [base.Item(str(p.relative_to(source)), p, label=-1) for p in listing.files]
    else:
      mask_listing = base.scan(mask_dir)
      masks = MaskIndex(mask_dir, mask_listing.files)
      paired = _pair_masks(listing.files, source, masks)
      test += [base.Item(str(p.relative_to(source)), p, m, label=None) for p, m in paired.items()]
      for orphan in sorted(set(masks.files) - set(paired.values())):
        test.append(
          base.Item(f"<mask>/{orphan}", orphan, error="mask without a matching image (by name)")
        )
      test += _skipped_items(mask_listing, mask_dir, "<mask>/")
    splits = {"test": test}
    if normal_dir is not None:
      normal = _list(normal_dir, "config.data.normal_path", ())
      splits["train"] = _skipped_items(normal, normal_dir) + [
        base.Item(str(p.relative_to(normal_dir)), p, label=0, defect_type=base.GOOD)
        for p in normal.files
      ]
    return splits

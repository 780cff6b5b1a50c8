"""A prepared split, read example by example as decoded NumPy arrays."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence

import ml_collections
import numpy as np

from maeday_jax.data import images, prepare
from maeday_jax.data.errors import DataError
from maeday_jax.download import DownloadError


def _text(value: bytes | str) -> str:
  # Records hold UTF-8 (names that are not are stored escaped, `names.to_text`); an
  # older record that is not must still read, escaped the same way.
  return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(eq=False)
class Split:
  """One split of one category: `len(split)`, `split[i]` -> decoded example.

  Attributes:
    dataset: the dataset name, e.g. 'mvtec_ad'.
    category: the category, e.g. 'bottle'.
    name: the split, 'train' or 'test'.
    source: the records (a tfds array_record data source, or any sequence of records
      with encoded 'image' and 'mask' bytes, 'label', 'defect_type', 'file_name').
    skipped: (path, reason) of every file left out when the split was prepared, and of
      any that failed to decode when read.
    file_names: the file names in record order, when known without reading the records.
    unmasked: how many images of the split had no mask although their labels come from
      masks (a folder dataset with `config.data.mask_path`); they are labelled normal (0).
  """

  dataset: str
  category: str
  name: str
  source: Sequence[Mapping]
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  file_names: Sequence[str] | None = dataclasses.field(default=None, repr=False)
  unmasked: int = 0
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False)

  def __len__(self) -> int:
    return len(self.source)

  def _record(self, index: int) -> Mapping:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {self} ({len(self)} examples)")
    # Reads are cheap and serialised; decoding (the costly part) runs in parallel.
    with self._lock:
      return self.source[index % len(self)]

  def file_name(self, index: int) -> str:
    """The example's file name without decoding its image."""
    if self.file_names is not None:
      return self.file_names[index]
    return _text(self._record(index)["file_name"])

  def __getitem__(self, index: int) -> dict:
    """The decoded example.

    Returns:
      dict with `image` uint8 (h, w, 3) at the original size, `mask` uint8 (h, w) in
      {0, 1}, `label` int (0 good, 1 anomalous, -1 unknown), `defect_type` str and
      `file_name` str (unique within the split).

    Raises:
      DataError: when the stored bytes cannot be decoded (naming the file).
    """
    record = self._record(index)
    file_name = _text(record["file_name"])
    where = f"{self.dataset}/{self.category}/{self.name}/{file_name}"
    image = images.decode_image(record["image"], where)
    if record["mask"]:
      mask = images.decode_mask(record["mask"], where, expected_hw=image.shape[:2])
    else:
      mask = np.zeros(image.shape[:2], dtype=np.uint8)
    return {
      "image": image,
      "mask": mask,
      "label": int(record["label"]),
      "defect_type": _text(record["defect_type"]),
      "file_name": file_name,
    }

  def __iter__(self) -> Iterator[dict]:
    for index in range(len(self)):
      yield self[index]

  def __str__(self) -> str:
    return f"{self.dataset}/{self.category}/{self.name}"


def _prepare_once(data_config: ml_collections.ConfigDict, category: str):
  """`prepare.prepare` on process 0 first; the other processes then open (or, with
  their own `data_dir`, build) it. Every process must call this: it holds a barrier."""
  import jax  # Only for multi-process runs; keeps the data layer cheap to import.

  if jax.process_count() == 1:
    return prepare.prepare(data_config, category)
  from maeday_jax import parallel

  builder, error = None, None
  if jax.process_index() == 0:
    # An error is raised after the barrier, so that no process waits forever.
    try:
      builder = prepare.prepare(data_config, category)
    except (DataError, DownloadError) as e:
      error = e
  parallel.barrier(f"maeday_jax: prepared {data_config.name}/{category}")
  if error is not None:
    raise error
  return builder if builder is not None else prepare.prepare(data_config, category)


def load_split(data_config: ml_collections.ConfigDict, category: str, split: str) -> Split:
  """Prepares the category if needed and returns one of its splits.

  Args:
    data_config: `config.data` (see `maeday_jax.settings.data.data_config`).
    category: one of `resolve_categories(data_config)`.
    split: 'train' or 'test'. For `folder`, 'test' is the images to score and 'train'
      the normal references (only when `config.data.normal_path` is set).

  Raises:
    DataError: for an unknown dataset, category or split, a missing path, or a source
      that cannot be prepared (each naming what is wrong).

  With several JAX processes, process 0 prepares the data first and the others wait
  for it (a barrier), so that hosts sharing `config.data.data_dir` build it once.
  """
  if data_config.name == "folder" and split == "train" and not data_config.get("normal_path"):
    raise DataError(
      "The folder dataset has no 'train' split: set config.data.normal_path to a folder of "
      "normal reference images."
    )
  builder = _prepare_once(data_config, category)
  if split not in builder.info.splits:
    raise DataError(
      f"{data_config.name}/{category} has no split '{split}'; "
      f"it has: {', '.join(sorted(builder.info.splits))}"
    )
  metadata = builder.info.metadata
  skipped = metadata.get("skipped", {}).get(split, [])
  source = builder.as_data_source(split)
  file_names = metadata.get("file_names", {}).get(split)
  return Split(
    dataset=data_config.name,
    category=category,
    name=split,
    source=source,
    skipped=[(str(path), str(reason)) for path, reason in skipped],
    file_names=file_names if file_names is not None and len(file_names) == len(source) else None,
    unmasked=int(metadata.get("unmasked", {}).get(split, 0)),
  )


def skipped_summary(splits: Iterable[Split]) -> str:
  """A readable list of every file left out of the given splits ('' when none)."""
  lines = []
  for split in splits:
    if split.skipped:
      lines.append(f"{split}: {len(split.skipped)} file(s) skipped")
      lines.extend(f"  {path}: {reason}" for path, reason in split.skipped)
  return "\n".join(lines)

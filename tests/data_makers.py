"""Tiny synthetic datasets in the MVTec AD, VisA, magnetic tile, BTAD, KolektorSDD2 and
folder layouts.

For the tests (the data builders' and the jobs' end-to-end tests; not part of the
installed package): each writer creates a few small images, including the odd files real
data has (grayscale, RGBA, palette, 16-bit, truncated, not an image, mask of the wrong
size, defect image without a mask), and returns what the builders must make of them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import tarfile
import zlib

import numpy as np
from PIL import Image

_H, _W = 30, 40  # Small, not square, so height/width mix-ups show.


@dataclasses.dataclass
class Expected:
  """What reading one example must give back."""

  image: np.ndarray
  mask: np.ndarray
  label: int
  defect_type: str


@dataclasses.dataclass
class FakeDataset:
  """A written fake dataset.

  Attributes:
    root: the folder to give as `config.data.path`.
    examples: split -> file_name -> Expected, per category (key '' when there is none).
    skipped: category -> split -> image paths the builder must skip.
  """

  root: pathlib.Path
  examples: dict[str, dict[str, dict[str, Expected]]] = dataclasses.field(default_factory=dict)
  skipped: dict[str, dict[str, list[str]]] = dataclasses.field(default_factory=dict)

  def add(self, category: str, split: str, file_name: str, expected: Expected) -> None:
    self.examples.setdefault(category, {}).setdefault(split, {})[file_name] = expected

  def skip(self, category: str, split: str, path: pathlib.Path) -> None:
    self.skipped.setdefault(category, {}).setdefault(split, []).append(str(path))


def _rng(key: str) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(key.encode()))


def _save(path: pathlib.Path, image: Image.Image, **kwargs) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, **kwargs)


def write_image(
  path: pathlib.Path, kind: str = "rgb", hw: tuple[int, int] = (_H, _W)
) -> np.ndarray:
  """Writes an image of the given kind; returns the uint8 (h, w, 3) it must decode to.

  Kinds: 'rgb', 'gray', 'rgba', 'palette', 'gray16' (PNG), 'jpeg' (RGB) and 'gray_jpeg'.
  """
  rng = _rng(str(path.name) + kind)
  h, w = hw
  rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (h, w), dtype=np.uint8)
  if kind == "rgb":
    _save(path, Image.fromarray(rgb), format="PNG")
    return rgb
  if kind == "gray":
    _save(path, Image.fromarray(gray), format="PNG")
    return np.repeat(gray[..., None], 3, -1)
  if kind == "rgba":
    alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
    _save(path, Image.fromarray(np.concatenate([rgb, alpha], -1)), format="PNG")
    return rgb
  if kind == "palette":
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    image = Image.fromarray(gray, mode="P")
    image.putpalette(palette.reshape(-1).tolist())
    _save(path, image, format="PNG")
    return palette[gray]
  if kind == "gray16":
    wide = rng.integers(0, 65536, (h, w), dtype=np.uint16)
    _save(path, Image.fromarray(wide), format="PNG")
    return np.repeat(np.rint(wide / 257.0).astype(np.uint8)[..., None], 3, -1)
  if kind in ("jpeg", "gray_jpeg"):
    image = Image.fromarray(rgb if kind == "jpeg" else gray)
    _save(path, image, format="JPEG", quality=90)
    with Image.open(path) as written:  # JPEG is lossy: expect what Pillow reads back.
      return np.asarray(written.convert("RGB"))
  raise ValueError(f"unknown image kind {kind}")


def write_mask(
  path: pathlib.Path, hw: tuple[int, int] = (_H, _W), kind: str = "binary", empty: bool = False
) -> np.ndarray:
  """Writes a mask; returns the {0, 1} uint8 (h, w) it must decode to.

  Kinds: 'binary' (L, 0/255), 'levels' (L, several non-zero values), 'palette', 'rgb'.
  """
  rng = _rng(str(path) + kind)
  h, w = hw
  binary = np.zeros(hw, np.uint8)
  if not empty:
    top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    binary[top : top + h // 3, left : left + w // 3] = 1
  if kind == "binary":
    image = Image.fromarray(binary * 255)
  elif kind == "levels":
    image = Image.fromarray(binary * rng.integers(1, 256, hw, dtype=np.uint8))
  elif kind == "palette":
    image = Image.fromarray(binary * 2, mode="P")
    image.putpalette([255, 255, 255, 0, 0, 0, 255, 0, 0] + [0] * 759)  # index 0 is white
  elif kind == "rgb":
    image = Image.fromarray(np.stack([binary * 200, binary * 0, binary * 0], -1))
  else:
    raise ValueError(f"unknown mask kind {kind}")
  _save(path, image, format="PNG")
  return binary


def write_truncated(path: pathlib.Path) -> None:
  """Writes a PNG cut in the middle (a partial download)."""
  buffer = io.BytesIO()
  Image.fromarray(_rng(path.name).integers(0, 256, (_H, _W, 3), dtype=np.uint8)).save(
    buffer, format="PNG"
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def write_not_image(path: pathlib.Path) -> None:
  """Writes a text file (with whatever suffix the path has)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("not an image\n")


def _zeros(hw: tuple[int, int] = (_H, _W)) -> np.ndarray:
  return np.zeros(hw, np.uint8)


def make_mvtec(
  root: pathlib.Path, categories: tuple[str, ...] = ("bottle", "carpet")
) -> FakeDataset:
  """Writes the MVTec AD layout for `categories` (names must be MVTec AD categories)."""
  fake = FakeDataset(root)
  for category in categories:
    cat = root / category
    train = cat / "train" / "good"
    for i, kind in enumerate(["rgb", "gray", "rgba", "palette", "gray16"]):
      hw = (_H, _W) if i % 2 == 0 else (16, 16)
      image = write_image(train / f"00{i}.png", kind, hw)
      fake.add(category, "train", f"train/good/00{i}.png", Expected(image, _zeros(hw), 0, "good"))
    write_truncated(train / "005.png")
    fake.skip(category, "train", train / "005.png")
    write_not_image(train / "notes.txt")
    fake.skip(category, "train", train / "notes.txt")
    (train / ".DS_Store").write_text("hidden files are ignored")

    for i in range(2):
      image = write_image(cat / "test" / "good" / f"00{i}.png", "rgb")
      fake.add(category, "test", f"test/good/00{i}.png", Expected(image, _zeros(), 0, "good"))
    truth = cat / "ground_truth"
    for defect, name, mask_kind in [("broken", "000", "binary"), ("broken", "001", "levels")]:
      image = write_image(cat / "test" / defect / f"{name}.png", "rgb")
      mask = write_mask(truth / defect / f"{name}_mask.png", kind=mask_kind)
      fake.add(category, "test", f"test/{defect}/{name}.png", Expected(image, mask, 1, defect))
    image = write_image(cat / "test" / "crack" / "000.png", "gray")
    mask = write_mask(truth / "crack" / "000_mask.png", kind="palette")
    fake.add(category, "test", "test/crack/000.png", Expected(image, mask, 1, "crack"))
    # Bad files: no mask, mask of another size, not an image (with a mask).
    write_image(cat / "test" / "broken" / "002.png")
    fake.skip(category, "test", cat / "test" / "broken" / "002.png")
    write_image(cat / "test" / "broken" / "003.png")
    write_mask(truth / "broken" / "003_mask.png", hw=(_W, _H))
    fake.skip(category, "test", cat / "test" / "broken" / "003.png")
    write_not_image(cat / "test" / "broken" / "004.png")
    write_mask(truth / "broken" / "004_mask.png")
    fake.skip(category, "test", cat / "test" / "broken" / "004.png")
  return fake


def make_visa(root: pathlib.Path, categories: tuple[str, ...] = ("candle", "pcb1")) -> FakeDataset:
  """Writes the VisA layout with `split_csv/1cls.csv` for `categories`."""
  fake = FakeDataset(root)
  rows = []
  for category in categories:
    for i, (split, kind) in enumerate(
      [("train", "jpeg"), ("train", "gray_jpeg"), ("test", "jpeg")]
    ):
      rel = f"{category}/Data/Images/Normal/{i:04d}.JPG"
      image = write_image(root / rel, kind)
      rows.append([category, split, "normal", rel, ""])
      fake.add(
        category, split, rel.removeprefix(f"{category}/"), Expected(image, _zeros(), 0, "good")
      )
    for i, mask_kind in enumerate(["palette", "levels"]):
      rel, mask_rel = (
        f"{category}/Data/Images/Anomaly/{i:03d}.JPG",
        f"{category}/Data/Masks/Anomaly/{i:03d}.png",
      )
      image = write_image(root / rel, "jpeg")
      mask = write_mask(root / mask_rel, kind=mask_kind)
      rows.append([category, "test", "anomaly", rel, mask_rel])
      fake.add(
        category, "test", rel.removeprefix(f"{category}/"), Expected(image, mask, 1, "anomaly")
      )
    # Bad rows: missing mask file, truncated image, listed image that does not exist.
    rel = f"{category}/Data/Images/Anomaly/010.JPG"
    write_image(root / rel, "jpeg")
    rows.append([category, "test", "anomaly", rel, f"{category}/Data/Masks/Anomaly/010.png"])
    fake.skip(category, "test", root / rel)
    rel = f"{category}/Data/Images/Normal/0010.JPG"
    write_truncated(root / rel)
    rows.append([category, "train", "normal", rel, ""])
    fake.skip(category, "train", root / rel)
    rel = f"{category}/Data/Images/Normal/0011.JPG"
    rows.append([category, "test", "normal", rel, ""])
    fake.skip(category, "test", root / rel)
  (root / "split_csv").mkdir(parents=True, exist_ok=True)
  with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["object", "split", "label", "image", "mask"])
    writer.writerows(rows)
  return fake


def make_magnetic_tile(root: pathlib.Path, num_free: int = 8) -> FakeDataset:
  """Writes the magnetic tile layout (grayscale JPEGs of varying size, PNG masks)."""
  from maeday_jax.data.builders import magnetic_tile  # The split rule lives there.

  fake = FakeDataset(root)
  for i in range(num_free):
    name = f"exp{i}_num_{100 + i}.jpg"
    path = root / "MT_Free" / "Imgs" / name
    hw = (20 + i, 36 - i)
    image = write_image(path, "gray_jpeg", hw)
    write_mask(path.with_suffix(".png"), hw, empty=True)
    split = "train" if magnetic_tile.is_train_normal(name) else "test"
    fake.add("", split, f"MT_Free/Imgs/{name}", Expected(image, _zeros(hw), 0, "good"))
  for cls in magnetic_tile.DEFECT_CLASSES:
    for i in range(2):
      path = root / cls / "Imgs" / f"exp1_num_{i}.jpg"
      hw = (24 + i, 18 + 3 * i)
      image = write_image(path, "gray_jpeg", hw)
      mask = write_mask(path.with_suffix(".png"), hw, kind="levels")
      defect = cls.removeprefix("MT_").lower()
      fake.add("", "test", f"{cls}/Imgs/{path.name}", Expected(image, mask, 1, defect))
  crack = root / "MT_Crack" / "Imgs"
  write_image(crack / "exp9_num_1.jpg", "gray_jpeg")  # No mask.
  fake.skip("", "test", crack / "exp9_num_1.jpg")
  write_image(crack / "exp9_num_2.jpg", "gray_jpeg")
  write_mask(crack / "exp9_num_2.png", hw=(10, 10))  # Wrong size.
  fake.skip("", "test", crack / "exp9_num_2.jpg")
  return fake


def _to_bmp(path: pathlib.Path) -> pathlib.Path:
  """Re-saves a (lossless PNG) image or mask as BMP beside it; returns the BMP's path."""
  bmp = path.with_suffix(".bmp")
  with Image.open(path) as image:
    image.save(bmp, format="BMP")
  path.unlink()
  return bmp


# BTAD's formats per product: (image suffix, mask suffix).
BTAD_FORMATS = {"01": (".bmp", ".png"), "02": (".png", ".png"), "03": (".bmp", ".bmp")}


def _btad_image(
  folder: pathlib.Path, rel: str, suffix: str, kind: str = "rgb", hw=(_H, _W)
) -> tuple[str, np.ndarray]:
  """Writes `<folder>/<rel><suffix>`; returns its path inside `folder` and its pixels."""
  written = write_image(folder / f"{rel}.png", kind, hw)
  path = folder / f"{rel}.png" if suffix == ".png" else _to_bmp(folder / f"{rel}.png")
  return path.relative_to(folder).as_posix(), written


def _btad_mask(
  folder: pathlib.Path, stem: str, suffix: str, kind: str = "binary", hw=(_H, _W)
) -> np.ndarray:
  """Writes `<folder>/ground_truth/ko/<stem><suffix>`; returns its {0, 1} pixels."""
  path = folder / "ground_truth" / "ko" / f"{stem}.png"
  written = write_mask(path, hw, kind)
  if suffix == ".bmp":
    _to_bmp(path)
  return written


def make_btad(root: pathlib.Path, products: tuple[str, ...] = ("01", "02", "03")) -> FakeDataset:
  """Writes the BTAD layout for `products` (each in its real image / mask formats)."""
  fake = FakeDataset(root)
  for product in products:
    image_suffix, mask_suffix = BTAD_FORMATS[product]
    folder = root / product
    for i, (kind, hw) in enumerate([("rgb", (_H, _W)), ("gray", (16, 16)), ("rgb", (_H, _W))]):
      name, written = _btad_image(folder, f"train/ok/{i:04d}", image_suffix, kind, hw)
      fake.add(product, "train", name, Expected(written, _zeros(hw), 0, "good"))
    write_truncated(folder / "train" / "ok" / f"0009{image_suffix}")
    fake.skip(product, "train", folder / "train" / "ok" / f"0009{image_suffix}")
    write_not_image(folder / "train" / "ok" / "notes.txt")
    fake.skip(product, "train", folder / "train" / "ok" / "notes.txt")
    for i in range(2):
      name, written = _btad_image(folder, f"test/ok/{i:04d}", image_suffix)
      fake.add(product, "test", name, Expected(written, _zeros(), 0, "good"))
    for i, kind in enumerate(["binary", "levels"]):
      name, written = _btad_image(folder, f"test/ko/{i:04d}", image_suffix, "rgb" if i else "gray")
      mask = _btad_mask(folder, f"{i:04d}", mask_suffix, kind)
      fake.add(product, "test", name, Expected(written, mask, 1, "anomaly"))
    # Bad files: a ko image without a mask, one whose mask has another size, an orphan mask.
    name, _ = _btad_image(folder, "test/ko/0007", image_suffix)
    fake.skip(product, "test", folder / name)
    name, _ = _btad_image(folder, "test/ko/0008", image_suffix)
    _btad_mask(folder, "0008", mask_suffix, hw=(_W, _H))
    fake.skip(product, "test", folder / name)
    _btad_mask(folder, "0099", mask_suffix)
    fake.skip(product, "test", folder / "ground_truth" / "ko" / f"0099{mask_suffix}")
  return fake


def make_kolektorsdd2(root: pathlib.Path) -> FakeDataset:
  """Writes the KolektorSDD2 layout: `<split>/<n>.png` beside `<split>/<n>_GT.png`.

  A defective train image (`10003.png`) is left out of `train` (not skipped: it is in
  neither the examples nor the skipped files).
  """
  fake = FakeDataset(root)
  train, test = root / "train", root / "test"
  for i, (kind, hw) in enumerate([("rgb", (_H, _W)), ("gray", (36, 12)), ("rgb", (_H, _W))]):
    written = write_image(train / f"1000{i}.png", kind, hw)
    write_mask(train / f"1000{i}_GT.png", hw, empty=True)
    fake.add("", "train", f"train/1000{i}.png", Expected(written, _zeros(hw), 0, "good"))
  write_image(train / "10003.png")
  write_mask(train / "10003_GT.png")  # Defective: left out of train.
  write_image(train / "10004.png")  # No ground truth.
  fake.skip("", "train", train / "10004.png")
  for i in range(2):
    written = write_image(test / f"2000{i}.png", "rgb")
    write_mask(test / f"2000{i}_GT.png", empty=True)
    fake.add("", "test", f"test/2000{i}.png", Expected(written, _zeros(), 0, "good"))
  for i, kind in [(2, "binary"), (3, "rgb")]:
    written = write_image(test / f"2000{i}.png", "gray")
    expected_mask = write_mask(test / f"2000{i}_GT.png", kind=kind)
    fake.add("", "test", f"test/2000{i}.png", Expected(written, expected_mask, 1, "anomaly"))
  write_image(test / "20007.png")  # No ground truth.
  fake.skip("", "test", test / "20007.png")
  write_image(test / "20008.png")
  write_mask(test / "20008_GT.png", hw=(_H + 2, _W))  # Another size.
  fake.skip("", "test", test / "20008.png")
  write_mask(test / "20099_GT.png")  # No image.
  fake.skip("", "test", test / "20099_GT.png")
  return fake


def make_folder(root: pathlib.Path) -> FakeDataset:
  """Writes `images/` (to score, one subfolder), `normal/` and `masks/` under `root`.

  Examples are recorded as labelled by the masks; without `mask_path` every label is -1.
  """
  fake = FakeDataset(root)
  images, normal, masks = root / "images", root / "normal", root / "masks"
  for i, kind in enumerate(["rgb", "gray16", "rgba"]):
    image = write_image(normal / f"ref{i}.png", kind)
    fake.add("", "train", f"ref{i}.png", Expected(image, _zeros(), 0, "good"))
  image = write_image(normal / "ref3.jpg", "jpeg", (16, 24))
  fake.add("", "train", "ref3.jpg", Expected(image, _zeros((16, 24)), 0, "good"))
  cases = [
    ("a.png", "rgb", "binary", False, 1),  # Mask with defect pixels -> 1.
    ("b.png", "gray", "binary", True, 0),  # All-zero mask -> 0.
    ("c.png", "palette", None, False, 0),  # No mask -> 0.
    ("sub/d.png", "rgb", "rgb", False, 1),  # Paired by relative path, '_mask' suffix.
  ]
  for name, kind, mask_kind, empty, label in cases:
    image = write_image(images / name, kind)
    mask = _zeros()
    if mask_kind:
      mask_name = name if mask_kind != "rgb" else name.replace(".png", "_mask.png")
      mask = write_mask(masks / mask_name, kind=mask_kind, empty=empty)
    fake.add("", "test", name, Expected(image, mask, label, "good" if label == 0 else "anomaly"))
  write_truncated(images / "e.png")
  fake.skip("", "test", images / "e.png")
  write_not_image(images / "readme.txt")
  fake.skip("", "test", images / "readme.txt")
  write_image(images / "f.png")
  write_mask(masks / "f.png", hw=(_H + 1, _W))
  fake.skip("", "test", images / "f.png")
  write_mask(masks / "orphan.png")
  fake.skip("", "test", masks / "orphan.png")
  return fake


def folder_fields(
  root: pathlib.Path, data_dir: pathlib.Path | None = None, masks: bool = True, normal: bool = True
) -> dict:
  """The `config.data` fields that read a `make_folder(root)` dataset: its images to
  score, and (unless turned off) its masks and normal references; prepared under
  `data_dir` when given."""
  fields = {
    "name": "folder",
    "path": str(root / "images"),
    "mask_path": str(root / "masks") if masks else "",
    "normal_path": str(root / "normal") if normal else "",
  }
  if data_dir is not None:
    fields["data_dir"] = str(data_dir)
  return fields


def make_tar(source: pathlib.Path, archive: pathlib.Path, arcname: str) -> pathlib.Path:
  """Packs `source` as `arcname/` into a tar archive (compression from the suffix)."""
  mode = "w:xz" if archive.suffix == ".xz" else "w"
  with tarfile.open(archive, mode) as tar:
    tar.add(source, arcname=arcname)
  return archive


def check_split(split, fake: FakeDataset, category: str = "") -> None:
  """Asserts that a loaded split holds exactly the fake's examples and skipped files."""
  expected = fake.examples.get(category, {}).get(split.name, {})
  names = [split.file_name(i) for i in range(len(split))]
  assert split.file_names is None or list(split.file_names) == names
  assert sorted(names) == sorted(expected), (names, sorted(expected))
  assert len(set(names)) == len(names), f"file names are not unique: {names}"
  for i, name in enumerate(names):
    example, want = split[i], expected[name]
    assert example["file_name"] == name
    assert example["image"].dtype == np.uint8 and example["image"].shape == want.image.shape, name
    np.testing.assert_array_equal(example["image"], want.image, err_msg=name)
    assert example["mask"].dtype == np.uint8 and example["mask"].shape == want.mask.shape, name
    np.testing.assert_array_equal(example["mask"], want.mask, err_msg=name)
    assert example["label"] == want.label, name
    assert example["defect_type"] == want.defect_type, name
  # Compared inside the root, so copies extracted from an archive match too.
  want_skipped = sorted(
    pathlib.Path(p).relative_to(fake.root).as_posix()
    for p in fake.skipped.get(category, {}).get(split.name, [])
  )
  got_skipped = sorted(
    next((w for w in want_skipped if path.endswith("/" + w)), path) for path, _ in split.skipped
  )
  assert got_skipped == want_skipped, (got_skipped, want_skipped)
  assert all(reason for _, reason in split.skipped)

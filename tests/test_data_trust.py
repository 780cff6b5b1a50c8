"""Inputs that must not be trusted: decompression bombs, wide samples of fewer bits, file
names that are not UTF-8, and outputs of images deleted since the last run."""

import csv
import io
import os
import shutil
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from maeday_jax import data
from maeday_jax.data import images, names
from maeday_jax.jobs import common, outputs
from maeday_jax.jobs import zero_shot as zero_shot_job
from tests import data_makers
from tests.conftest import FIXTURE_MAE

GIB = 1 << 30


@pytest.fixture(autouse=True)
def default_budget(monkeypatch):
  """Every test starts and ends with the default pixel budget (it is process-wide)."""
  monkeypatch.delenv(images.PIXEL_BUDGET_ENV, raising=False)
  images.set_pixel_budget(0, threads=images.DEFAULT_DECODING_THREADS)
  yield
  images.set_pixel_budget(0, threads=images.DEFAULT_DECODING_THREADS)


# --- PNG and TIFF files written byte by byte -------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
  crc = zlib.crc32(kind + payload)
  return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
  """A valid 1-bit grayscale PNG of all-zero rows: a few KB that decode to width x height
  pixels (compressed row by row, so writing it never holds the pixels)."""
  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  row, packer = bytes(1 + (width + 7) // 8), zlib.compressobj(9)
  pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
  return (
    b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")
  )


def tiff12(values: np.ndarray) -> bytes:
  """An uncompressed 12-bit grayscale TIFF (BitsPerSample 12, samples packed MSB first)."""
  height, width = values.shape
  rows = []
  for row in values.astype(np.uint32):
    row = np.append(row, 0) if len(row) % 2 else row
    a, b = row[0::2], row[1::2]
    packed = np.stack([a >> 4, ((a & 15) << 4) | (b >> 8), b & 255], -1).astype(np.uint8)
    rows.append(packed.tobytes()[: (width * 12 + 7) // 8])  # Rows end on a byte.
  pixels = b"".join(rows)
  # (tag, type: 3 SHORT or 4 LONG, value); the pixels follow the one IFD.
  tags = [(256, 3, width), (257, 3, height), (258, 3, 12), (259, 3, 1), (262, 3, 1)]
  tags += [(273, 4, None), (277, 3, 1), (278, 3, height), (279, 4, len(pixels))]
  offset = 8 + 2 + 12 * len(tags) + 4
  out = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(tags))
  for tag, kind, value in tags:
    value = offset if value is None else value
    pack = "<HHIHH" if kind == 3 else "<HHII"
    out += (
      struct.pack(pack, tag, kind, 1, value, 0)
      if kind == 3
      else struct.pack(pack, tag, kind, 1, value)
    )
  return out + struct.pack("<I", 0) + pixels


def png16(values: np.ndarray, sbit: int | None = None) -> bytes:
  """A 16-bit grayscale PNG written by Pillow, with an sBIT chunk when `sbit` is given."""
  info = PngImagePlugin.PngInfo()
  if sbit is not None:
    info.add(b"sBIT", bytes([sbit]))
  buffer = io.BytesIO()
  Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG", pnginfo=info)
  return buffer.getvalue()


def _gray(decoded: np.ndarray) -> np.ndarray:
  assert decoded.dtype == np.uint8 and decoded.ndim == 3 and decoded.shape[-1] == 3
  np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])
  return decoded[..., 0]


# --- 10. Decompression bombs -----------------------------------------------------------


def test_a_bomb_is_refused_from_its_header_with_its_size_and_the_budget():
  bomb = bomb_png(20000, 20000)
  assert len(bomb) < 100_000  # 400 megapixels in a few tens of KB.
  with pytest.raises(data.DataError, match="image too large to decode") as info:
    data.decode_image(bomb, "bomb.png")
  error = info.value
  assert isinstance(error, images.ImageTooLarge) and error.path == "bomb.png"
  assert error.pixels == 400_000_000 and error.budget == images.pixel_budget()
  assert f"400,000,000 pixels exceeds the per-image budget of {error.budget:,}" in str(error)


def test_a_bomb_below_pillows_limit_is_refused_by_the_memory_budget(monkeypatch):
  """100 megapixels is under Pillow's limit (179): with 8 GiB and 4 threads, the budget
  (0.5 x 8 GiB / (4 x 20 bytes) = 53.7 megapixels) refuses it before decoding."""
  monkeypatch.setattr(images, "memory_bytes", lambda: 8 * GIB)
  budget = images.pixel_budget()
  assert budget == int(0.5 * 8 * GIB / (4 * images.BYTES_PER_PIXEL)) < 100_000_000
  with pytest.raises(
    images.ImageTooLarge, match=rf"10000x10000 = 100,000,000 pixels .* {budget:,}"
  ):
    data.decode_image(bomb_png(10000, 10000), "bomb.png")


def test_the_default_budget_rule(monkeypatch):
  assert images.memory_bytes() > 0  # This machine's memory is known.
  monkeypatch.setattr(images, "memory_bytes", lambda: 16 * 10**9)
  assert images.default_pixel_budget(4) == 100_000_000
  assert images.default_pixel_budget(8) == 50_000_000  # More threads, a smaller share each.
  monkeypatch.setattr(images, "memory_bytes", lambda: 1 << 40)
  assert images.default_pixel_budget(4) == images.MAX_DEFAULT_PIXELS == 250_000_000
  monkeypatch.setattr(images, "memory_bytes", lambda: None)  # Unknown: the cap.
  assert images.default_pixel_budget(4) == 250_000_000


def test_the_budget_is_set_by_the_job_setting_then_the_environment(tmp_path, monkeypatch):
  path = tmp_path / "x.png"
  data_makers.write_image(path, "rgb", (40, 50))  # 2000 pixels.
  assert data.read_image(path).shape == (40, 50, 3)
  monkeypatch.setenv(images.PIXEL_BUDGET_ENV, "1999")
  with pytest.raises(images.ImageTooLarge, match=r"x\.png: .*50x40 = 2,000 pixels .* 1,999"):
    data.read_image(path)
  assert images.set_pixel_budget(2000) == 2000  # The setting wins over the variable.
  assert data.read_image(path).shape == (40, 50, 3)
  with pytest.raises(images.ImageTooLarge):  # Masks too.
    images.set_pixel_budget(10)
    data.read_mask(path)
  monkeypatch.setenv(images.PIXEL_BUDGET_ENV, "lots")  # Not a count: warned, default.
  assert images.set_pixel_budget(0) == images.default_pixel_budget()
  with pytest.raises(data.DataError, match="max_image_pixels=-1: must be >= 0"):
    images.set_pixel_budget(-1)


def test_jobs_set_the_budget_from_config_data(data_config):
  config = ml_collections.ConfigDict({"data": data_config(max_image_pixels=1234, num_workers=2)})
  common.apply_pixel_budget(config)
  assert images.pixel_budget() == 1234
  config.data.max_image_pixels = 0
  common.apply_pixel_budget(config)
  assert images.pixel_budget() == images.default_pixel_budget(2)
  config.data.max_image_pixels = -5
  with pytest.raises(common.ConfigError, match="--config.data.max_image_pixels: must be >= 0"):
    common.apply_pixel_budget(config)


def test_the_folder_builder_skips_a_bomb_keeps_the_rest_and_rebuilds_when_it_fits(
  tmp_path, data_config
):
  folder = tmp_path / "photos"
  data_makers.write_image(folder / "a.png", "rgb", (20, 20))  # 400 pixels.
  data_makers.write_image(folder / "big.png", "rgb", (30, 40))  # 1200 pixels.
  (folder / "bomb.png").write_bytes(bomb_png(20000, 20000))
  config = data_config(name="folder", path=folder, data_dir=tmp_path / "tfds")
  images.set_pixel_budget(1000)
  split = data.load_split(config, "photos", "test")
  assert [e["file_name"] for e in split] == ["a.png"]
  reasons = dict(split.skipped)
  assert (
    "40x30 = 1,200 pixels exceeds the per-image budget of 1,000" in reasons[str(folder / "big.png")]
  )
  assert "400,000,000 pixels exceeds" in reasons[str(folder / "bomb.png")]
  # The same files, a budget that now admits big.png: prepared again, not the old skip.
  images.set_pixel_budget(5000)
  split = data.load_split(config, "photos", "test")
  assert [e["file_name"] for e in split] == ["a.png", "big.png"]
  assert list(dict(split.skipped)) == [str(folder / "bomb.png")]


# --- 11. Wide grayscale samples ----------------------------------------------------------


def test_16_bit_png_uses_the_full_16_bit_range():
  values = np.array([[0, 257, 32768], [65535, 4095, 1000]])
  np.testing.assert_array_equal(_gray(data.decode_image(png16(values))), np.rint(values / 257.0))


def test_12_bit_png_with_an_sbit_chunk_uses_the_12_bit_range():
  values = np.array([[0, 1, 2048], [4095, 4000, 100]])
  encoded = png16(values, sbit=12)
  assert b"sBIT" in encoded[: encoded.index(b"IDAT")]
  got = _gray(data.decode_image(encoded))
  np.testing.assert_array_equal(got, np.rint(values * 255 / 4095))
  assert got[1, 0] == 255  # Not 16, as if 16-bit: near-black.
  # Fixed per format, not per image: a darker image of the same sensor stays darker.
  darker = _gray(data.decode_image(png16(values // 2, sbit=12)))
  np.testing.assert_array_equal(darker, np.rint((values // 2) * 255 / 4095))


def test_png_with_sbit_whose_samples_are_shifted_up_reads_as_16_bit():
  """The PNG standard lets a writer scale 12-bit samples up to 16 bits (and say sBIT 12):
  samples above 4095, or all multiples of 16, are read with the 16-bit range."""
  original = np.array([[0, 1, 2048], [4095, 4000, 100]])
  for shifted in (original << 4, (original << 4) | (original >> 8)):  # Shift, replicate.
    got = _gray(data.decode_image(png16(shifted, sbit=12)))
    np.testing.assert_array_equal(got, np.rint(shifted / 257.0))
  dark = np.array([[0, 16, 160], [4080, 32, 48]])  # Dark, shifted: still multiples of 16.
  np.testing.assert_array_equal(_gray(data.decode_image(png16(dark, sbit=12))), np.rint(dark / 257))


def test_16_bit_tiff_written_by_pillow_uses_the_full_range():
  values = np.array([[0, 257, 32768], [65535, 4095, 1000]], np.uint16)
  buffer = io.BytesIO()
  Image.fromarray(values).save(buffer, format="TIFF")
  got = _gray(data.decode_image(buffer.getvalue()))
  np.testing.assert_array_equal(got, np.rint(values / 257.0))


def test_12_bit_tiff_uses_its_bits_per_sample():
  values = np.array([[0, 370, 740], [1110, 2048, 4095]])
  encoded = tiff12(values)
  with Image.open(io.BytesIO(encoded)) as image:
    assert image.mode == "I;16" and image.tag_v2[258] == (12,)
  np.testing.assert_array_equal(_gray(data.decode_image(encoded)), np.rint(values * 255 / 4095))


# --- 7. File names that are not UTF-8 ------------------------------------------------


def test_names_round_trip_losslessly():
  for raw in (b"bad\xff.png", b"caf\xe9/\x81x.jpg", b"ok.png", "é.png".encode()):
    on_disk = os.fsdecode(raw)
    text = names.to_text(on_disk)
    text.encode("utf-8")  # Valid text for records, CSV and JSON.
    assert names.to_disk(text) == on_disk and os.fsencode(names.to_disk(text)) == raw
  assert names.to_text(os.fsdecode(b"bad\xff.png")) == "bad\\xff.png"
  assert names.to_text("é.png") == "é.png"


def _write_bad_name(folder, source) -> bytes:
  raw = os.path.join(os.fsencode(folder), b"bad\xff.png")
  with open(raw, "wb") as f:
    f.write(source.read_bytes())
  return raw


def test_the_folder_builder_prepares_a_file_whose_name_is_not_utf8(tmp_path, data_config):
  folder = tmp_path / "photos"
  want = data_makers.write_image(folder / "a.png")
  _write_bad_name(folder, folder / "a.png")
  config = data_config(name="folder", path=folder, data_dir=tmp_path / "tfds")
  for _ in range(2):  # Prepared, then reused (it crashed on every rerun).
    split = data.load_split(config, "photos", "test")
    assert list(split.file_names) == ["a.png", "bad\\xff.png"] and not split.skipped
    example = split[1]
    assert example["file_name"] == "bad\\xff.png"
    np.testing.assert_array_equal(example["image"], want)


# --- 7 and 13 in the zero-shot job ----------------------------------------------------

RUN = {"model.checkpoint": FIXTURE_MAE, "data.num_workers": 2, "outputs.panels": -1}


def _scores(workdir) -> dict:
  with open(workdir / "scores.csv", encoding="utf-8") as f:
    return {row["file"]: row for row in csv.DictReader(f)}


def _outputs(workdir, kind: str) -> set[bytes]:
  """The file names (bytes, as on disk) under `<workdir>/<kind>/photos`."""
  folder = os.path.join(os.fsencode(workdir), kind.encode(), b"photos")
  return set(os.listdir(folder)) if os.path.isdir(folder) else set()


@pytest.fixture(scope="module")
def reruns(tmp_path_factory, job_config):
  """A zero-shot run on a folder holding a name that is not UTF-8; then c.png deleted
  and the same work directory rerun. Returns what each run left."""
  tmp = tmp_path_factory.mktemp("trust_run")
  folder = tmp / "photos"
  for name in ("a.png", "b.png", "c.png"):
    data_makers.write_image(folder / name)
  _write_bad_name(folder, folder / "b.png")
  config = job_config(
    "zero_shot",
    "runlocal",
    data={"name": "folder", "path": folder, "data_dir": tmp / "tfds"},
    **RUN,
  )
  workdir = tmp / "work"
  seen = []
  for step in range(2):
    if step == 1:
      os.remove(folder / "c.png")
    summary = zero_shot_job.run(config, workdir)
    seen.append(
      {
        "summary": summary,
        "scores": _scores(workdir),
        **{kind: _outputs(workdir, kind) for kind in ("maps", "overlays", "panels")},
      }
    )
  return workdir, seen


def test_zero_shot_scores_a_file_whose_name_is_not_utf8(reruns):
  workdir, (first, second) = reruns
  for run in (first, second):
    assert "bad\\xff.png" in run["scores"]  # Escaped text in scores.csv.
    assert np.isfinite(float(run["scores"]["bad\\xff.png"]["score"]))
    assert b"bad\xff.png.npz" in run["maps"]  # The original bytes on disk.
    assert b"bad\xff.png.png" in run["overlays"] and b"bad\xff.png.png" in run["panels"]
    assert not run["summary"]["skipped"]
  with np.load(os.path.join(os.fsencode(workdir), b"maps/photos/bad\xff.png.npz")) as f:
    height, width = data.read_image(workdir.parent / "photos" / "b.png").shape[:2]
    assert f["map"].shape == (height, width)  # A copy of b.png.


def test_a_rerun_removes_the_outputs_of_deleted_images(reruns):
  _, (first, second) = reruns
  assert set(first["scores"]) == {"a.png", "b.png", "c.png", "bad\\xff.png"}
  assert set(second["scores"]) == {"a.png", "b.png", "bad\\xff.png"}
  assert b"c.png.npz" in first["maps"] and b"c.png.png" in first["overlays"]
  assert second["maps"] == {b"a.png.npz", b"b.png.npz", b"bad\xff.png.npz"}
  assert second["overlays"] == {b"a.png.png", b"b.png.png", b"bad\xff.png.png"}
  assert second["panels"] == second["overlays"]


def test_stale_outputs_are_removed_and_empty_folders_with_them(tmp_path):
  kept = outputs.output_path(tmp_path, "maps", "cat", "sub/a.png", ".npz")
  gone = outputs.output_path(tmp_path, "maps", "cat", "old/b.png", ".npz")
  overlay = outputs.output_path(tmp_path, "overlays", "cat", "old/b.png", ".png")
  other = outputs.output_path(tmp_path, "maps", "other", "b.png", ".npz")
  temporary = kept.with_name(".a.png.npz.tmp-0123")  # Another process writing.
  for path in (kept, gone, overlay, other, temporary):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
  removed = outputs.remove_stale_outputs(tmp_path, "cat", ["sub/a.png"])
  assert sorted(removed) == sorted([gone, overlay])
  assert kept.exists() and other.exists() and temporary.exists()
  assert not (tmp_path / "maps" / "cat" / "old").exists()
  assert not (tmp_path / "overlays").exists()  # No empty folder left behind.
  # Nothing kept: the category's folders and the empty maps/ itself go.
  shutil.rmtree(tmp_path / "maps" / "other")
  temporary.unlink()
  outputs.remove_stale_outputs(tmp_path, "cat", [])
  assert not (tmp_path / "maps").exists()


def test_a_run_with_nothing_readable_is_refused_by_name_and_leaves_no_maps(tmp_path, job_config):
  folder = tmp_path / "photos"
  data_makers.write_not_image(folder / "readme.txt")
  data_makers.write_truncated(folder / "cut.png")
  fields = {"name": "folder", "path": folder, "data_dir": tmp_path / "tfds"}
  config = job_config("zero_shot", "runlocal", data=fields, **RUN)
  with pytest.raises(
    data.DataError, match=r"no usable image in the 'test' split: all 2 file"
  ) as info:
    zero_shot_job.run(config, tmp_path / "work")
  assert "cut.png: unreadable or truncated" in str(info.value)
  assert sorted(os.listdir(tmp_path / "work")) == ["config.json"]

"""Per-image outputs: one file per input, written atomically; the atomic-file helpers."""

import io
import pathlib
import time

import numpy as np
import numpy.lib.format
import pytest
from PIL import Image

from maeday_jax import atomic_files
from maeday_jax.jobs import outputs


def _temporaries(folder: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in folder.rglob("*") if atomic_files.TEMPORARY_MARKER in p.name]


def test_output_path_keeps_the_whole_name_and_appends_the_suffix(tmp_path):
  path = outputs.output_path(tmp_path, "maps", "bottle", "sub/good0.jpg", ".npz")
  assert path == tmp_path / "maps" / "bottle" / "sub" / "good0.jpg.npz"
  jpg, png = (
    outputs.output_path(tmp_path, "overlays", "c", f"good0.{e}", ".png") for e in ("jpg", "png")
  )
  assert jpg.name == "good0.jpg.png" and png.name == "good0.png.png"
  assert outputs.output_path(tmp_path, "maps", "c", "a\\b.png", ".npz") == (
    tmp_path / "maps" / "c" / "a" / "b.png.npz"
  )
  assert outputs.output_path(tmp_path, "maps", "c", "noext", ".npz").name == "noext.npz"
  # Nothing escapes <workdir>/<kind>/<category>.
  root = tmp_path / "maps" / "c"
  for name in ("../../x.png", "/etc/x.png", "//srv/x.png", "a/../../x.png", "..\\x.png"):
    path = outputs.output_path(tmp_path, "maps", "c", name, ".npz")
    assert path.is_relative_to(root) and ".." not in path.parts, name
    assert path.name == "x.png.npz", name
  assert outputs.output_path(tmp_path, "maps", "c", "..", ".npz") == root / "unnamed.npz"


def test_writer_paths_follow_output_path(tmp_path):
  writer = outputs.OutputWriter(tmp_path, "bottle")
  try:
    assert writer.path("panels", "sub/a.bmp", ".png") == outputs.output_path(
      tmp_path, "panels", "bottle", "sub/a.bmp", ".png"
    )
  finally:
    writer.close()


def test_files_differing_only_in_extension_get_maps_and_overlays_of_their_own(tmp_path):
  names = ["sub/good0.jpg", "sub/good0.png"]
  maps = {
    names[0]: np.zeros((4, 4), np.float32),
    names[1]: np.arange(16, dtype=np.float32).reshape(4, 4),
  }
  writer = outputs.OutputWriter(tmp_path, "cat")
  try:
    for name, anomaly_map in maps.items():
      writer.save_map(name, anomaly_map, (8, 6))
    writer.wait()
    for name, anomaly_map in maps.items():
      example = {
        "file_name": name,
        "image": np.full((8, 6, 3), 100, np.uint8),
        "label": 0,
        "mask": np.zeros((8, 6), bool),
      }
      outputs.save_overlay_and_panel(
        writer, example, anomaly_map, 0.0, 0.0, 15.0, overlay=True, panel=True, threshold=None
      )
    writer.wait()
  finally:
    writer.close()
  assert writer.failures == []
  folder = tmp_path / "maps" / "cat" / "sub"
  assert sorted(p.name for p in folder.iterdir()) == ["good0.jpg.npz", "good0.png.npz"]
  loaded = {name: writer.load_map(name) for name in names}
  assert loaded[names[0]].shape == (8, 6) and np.all(loaded[names[0]] == 0)
  assert loaded[names[1]].max() > 0
  with np.load(folder / "good0.png.npz") as f:
    np.testing.assert_array_equal(f["map"], loaded[names[1]])
  overlays = tmp_path / "overlays" / "cat" / "sub"
  assert sorted(p.name for p in overlays.iterdir()) == ["good0.jpg.png", "good0.png.png"]
  jpg, png = (np.asarray(Image.open(overlays / f"{n}.png")) for n in ("good0.jpg", "good0.png"))
  assert not np.array_equal(jpg, png)
  panels = tmp_path / "panels" / "cat" / "sub"
  assert sorted(p.name for p in panels.iterdir()) == ["good0.jpg.png", "good0.png.png"]


def test_maps_have_the_same_bytes_as_savez_compressed_to_a_path(tmp_path, monkeypatch):
  # Zip entries carry the time they were written; hold the clock still to compare bytes.
  frozen = time.localtime(1_700_000_000)
  monkeypatch.setattr(time, "localtime", lambda *args: frozen)
  anomaly_map = np.random.default_rng(0).random((5, 7)).astype(np.float32)
  writer = outputs.OutputWriter(tmp_path, "cat")
  try:
    writer.save_map("a.png", anomaly_map, (5, 7))
    writer.wait()
  finally:
    writer.close()
  assert writer.failures == []
  reference = tmp_path / "reference.npz"
  np.savez_compressed(reference, map=anomaly_map)
  written = writer.path("maps", "a.png", ".npz")
  assert written.read_bytes() == reference.read_bytes()
  buffer = io.BytesIO()
  np.savez_compressed(buffer, map=anomaly_map)
  assert buffer.getvalue() == reference.read_bytes()


def test_a_map_write_that_fails_half_way_keeps_the_previous_map(tmp_path, monkeypatch):
  writer = outputs.OutputWriter(tmp_path, "cat")
  try:
    writer.save_map("a.png", np.ones((4, 4), np.float32), (4, 4))
    writer.wait()
    path = writer.path("maps", "a.png", ".npz")
    before = path.read_bytes()
    real_write_array = numpy.lib.format.write_array

    def write_half_then_fail(fid, array, *args, **kwargs):
      real_write_array(fid, array[: len(array) // 2], *args, **kwargs)
      raise OSError("disk full")

    monkeypatch.setattr(numpy.lib.format, "write_array", write_half_then_fail)
    writer.save_map("a.png", np.zeros((4, 4), np.float32), (4, 4))
    writer.wait()
  finally:
    writer.close()
  assert writer.failures == [("a.png", "OSError: disk full")]
  assert path.read_bytes() == before
  np.testing.assert_array_equal(writer.load_map("a.png"), np.ones((4, 4)))
  assert _temporaries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# atomic_files.


def test_write_bytes_and_text_create_folders_and_replace(tmp_path):
  path = atomic_files.write_bytes(tmp_path / "a" / "b" / "x.bin", b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  atomic_files.write_bytes(path, b"new")
  assert path.read_bytes() == b"new"
  text = atomic_files.write_text(tmp_path / "t" / "x.md", "± —\nline\n")
  reference = tmp_path / "reference.md"
  reference.write_text("± —\nline\n", encoding="utf-8")
  assert text.read_bytes() == reference.read_bytes()
  assert _temporaries(tmp_path) == []


def test_replace_when_done_names_its_temporary_beside_the_target(tmp_path):
  target = tmp_path / "sub" / "out.png"
  with atomic_files.replace_when_done(target) as tmp:
    assert tmp.parent == target.parent and tmp.parent.is_dir()
    assert tmp.name.startswith(".out.png.tmp-") and len(tmp.name) > len(".out.png.tmp-")
    tmp.write_bytes(b"done")
    assert not target.exists()  # nothing appears before the block ends
  assert target.read_bytes() == b"done" and not tmp.exists()
  with atomic_files.replace_when_done(target) as other:
    other.write_bytes(b"again")
  assert other != tmp


def test_replace_when_done_keeps_the_old_file_when_writing_fails(tmp_path):
  target = atomic_files.write_bytes(tmp_path / "out.bin", b"old")
  with (
    pytest.raises(RuntimeError, match="half way"),
    atomic_files.replace_when_done(target) as tmp,
  ):
    with open(tmp, "xb") as f:
      f.write(b"partial")
    raise RuntimeError("half way")
  assert target.read_bytes() == b"old"
  assert _temporaries(tmp_path) == []
  # A failure before the temporary file exists is reported as it is.
  with pytest.raises(KeyError), atomic_files.replace_when_done(tmp_path / "none.bin"):
    raise KeyError("x")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_replace_when_done_cleans_up_when_the_move_fails(tmp_path, monkeypatch):
  target = atomic_files.write_bytes(tmp_path / "out.bin", b"old")

  def refuse(*args):
    raise PermissionError("read-only")

  monkeypatch.setattr(atomic_files.os, "replace", refuse)
  with pytest.raises(PermissionError):
    atomic_files.write_bytes(target, b"new")
  assert target.read_bytes() == b"old"
  assert _temporaries(tmp_path) == []

"""Folder builder with awkward inputs: symbolic links, concurrent runs, replaced files, masks."""

import hashlib
import multiprocessing
import os
import queue
import time

import numpy as np
import pytest
from PIL import Image

from maeday_jax import data
from tests import data_makers
from tests.conftest import make_data_config


def _names(split) -> list[str]:
  return [split.file_name(i) for i in range(len(split))]


# Symbolic links.


def test_broken_symlink_is_skipped_and_the_others_are_scored(tmp_path, data_config):
  images = tmp_path / "images"
  data_makers.write_image(images / "a.png")
  (images / "gone.png").symlink_to(tmp_path / "deleted.png")
  (images / "alias.png").symlink_to(images / "a.png")  # A link to a real image is read.
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds")
  split = data.load_split(config, "images", "test")
  assert _names(split) == ["a.png", "alias.png"]
  np.testing.assert_array_equal(split[1]["image"], split[0]["image"])
  reasons = dict(split.skipped)
  assert list(reasons) == [str(images / "gone.png")]
  assert "broken symbolic link" in reasons[str(images / "gone.png")]


def test_broken_symlink_in_the_references_and_masks(tmp_path, data_config):
  images, normal, masks = tmp_path / "images", tmp_path / "normal", tmp_path / "masks"
  data_makers.write_image(images / "a.png")
  data_makers.write_image(images / "b.png")
  data_makers.write_mask(masks / "a.png")
  (masks / "b.png").symlink_to(tmp_path / "deleted_mask.png")
  data_makers.write_image(normal / "ref.png")
  (normal / "gone.png").symlink_to(tmp_path / "deleted_ref.png")
  config = data_config(
    name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks, normal_path=normal
  )
  test = data.load_split(config, "images", "test")
  assert _names(test) == ["a.png"]
  ((path, reason),) = test.skipped
  assert path == str(images / "b.png")
  assert str(masks / "b.png") in reason and "broken symbolic link" in reason
  train = data.load_split(config, "images", "train")
  assert _names(train) == ["ref.png"]
  assert [p for p, _ in train.skipped] == [str(normal / "gone.png")]


def test_symlinked_folders_are_followed(tmp_path, data_config):
  images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
  data_makers.write_image(images / "a.png")
  data_makers.write_image(elsewhere / "x.png")
  data_makers.write_image(elsewhere / "deeper" / "y.png")
  (images / "linked").symlink_to(elsewhere, target_is_directory=True)
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds")
  split = data.load_split(config, "images", "test")
  assert _names(split) == ["a.png", "linked/deeper/y.png", "linked/x.png"]
  assert split.skipped == []


def test_symlink_loops_are_skipped_not_followed(tmp_path, data_config):
  images = tmp_path / "images"
  data_makers.write_image(images / "a.png")
  data_makers.write_image(images / "sub" / "b.png")
  (images / "sub" / "back").symlink_to(images, target_is_directory=True)  # Loop.
  (images / "spin.png").symlink_to(images / "spin.png")  # A link to itself.
  (images / "twice").symlink_to(images / "sub", target_is_directory=True)  # Same folder.
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds")
  split = data.load_split(config, "images", "test")
  assert _names(split) == ["a.png", "sub/b.png"]
  reasons = dict(split.skipped)
  assert sorted(reasons) == sorted(str(images / n) for n in ("sub/back", "spin.png", "twice"))
  assert "loop" in reasons[str(images / "sub" / "back")]
  assert "loop" in reasons[str(images / "spin.png")]
  assert "already listed" in reasons[str(images / "twice")]


# Two runs at once.


def _prepare_in_process(images, data_dir, barrier, results):
  try:
    import jax  # noqa: F401  Imported before the barrier, so that both start together.

    from maeday_jax.data.builders import base

    make_example = base.make_example

    def slow_make_example(item):  # So that the two preparations surely overlap.
      time.sleep(0.05)
      return make_example(item)

    base.make_example = slow_make_example
    barrier.wait(timeout=120)
    config = make_data_config(name="folder", path=images, data_dir=data_dir)
    split = data.load_split(config, "images", "test")
    contents = [hashlib.sha256(split[i]["image"].tobytes()).hexdigest() for i in range(len(split))]
    results.put(("ok", _names(split), contents))
  except BaseException as e:  # Reported to the test, which fails with it.
    results.put(("error", repr(e), None))


def test_two_processes_prepare_the_same_folder_at_once(tmp_path):
  images = tmp_path / "images"
  for i in range(24):
    data_makers.write_image(images / f"{i:03d}.png", hw=(64, 64))
  context = multiprocessing.get_context("spawn")
  barrier, results = context.Barrier(2), context.Queue()
  args = (images, tmp_path / "tfds", barrier, results)
  processes = [context.Process(target=_prepare_in_process, args=args) for _ in range(2)]
  for p in processes:
    p.start()
  try:
    outcomes = [results.get(timeout=240) for _ in processes]
  except queue.Empty:
    pytest.fail("a preparing process did not report within 240 s")
  finally:
    for p in processes:
      p.join(timeout=30)
      if p.is_alive():
        p.kill()
  assert [o[0] for o in outcomes] == ["ok", "ok"], outcomes
  assert outcomes[0][1] == outcomes[1][1] == [f"{i:03d}.png" for i in range(24)]
  assert outcomes[0][2] == outcomes[1][2]
  assert not list((tmp_path / "tfds").rglob("*.incomplete*"))


# A file replaced by one of the same size and modification time.


def _write_bmp(path, seed: int) -> np.ndarray:
  """An uncompressed image: the file size depends on the shape only."""
  rgb = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
  tmp = path.with_name(path.name + ".tmp")
  Image.fromarray(rgb).save(tmp, format="BMP")
  tmp.replace(path)  # A new inode.
  return rgb


def _overwrite_keeping_size_and_mtime(path, new_content_from, in_place: bool):
  before = path.stat()
  content = new_content_from.read_bytes()
  assert len(content) == before.st_size
  if in_place:  # Same inode, new bytes.
    with open(path, "r+b") as f:
      f.write(content)
  else:  # What `cp -p` does to a replaced file: a new inode, times copied.
    os.remove(path)
    path.write_bytes(content)
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  after = path.stat()
  assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "new_inode"])
def test_replaced_image_with_the_same_size_and_mtime_is_rebuilt(tmp_path, in_place, data_config):
  images = tmp_path / "images"
  images.mkdir()
  old = _write_bmp(images / "a.bmp", seed=1)
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds")
  np.testing.assert_array_equal(data.load_split(config, "images", "test")[0]["image"], old)
  new = _write_bmp(tmp_path / "new.bmp", seed=2)
  _overwrite_keeping_size_and_mtime(images / "a.bmp", tmp_path / "new.bmp", in_place)
  np.testing.assert_array_equal(data.load_split(config, "images", "test")[0]["image"], new)


def test_replaced_mask_with_the_same_size_and_mtime_is_rebuilt(tmp_path, data_config):
  images, masks = tmp_path / "images", tmp_path / "masks"
  data_makers.write_image(images / "a.png", hw=(12, 16))
  masks.mkdir()
  empty = np.zeros((12, 16), np.uint8)
  full = np.ones((12, 16), np.uint8)
  Image.fromarray(empty).save(masks / "a.bmp", format="BMP")
  Image.fromarray(full * 255).save(tmp_path / "full.bmp", format="BMP")
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks)
  first = data.load_split(config, "images", "test")[0]
  assert first["label"] == 0 and not first["mask"].any()
  _overwrite_keeping_size_and_mtime(masks / "a.bmp", tmp_path / "full.bmp", in_place=True)
  second = data.load_split(config, "images", "test")[0]
  assert second["label"] == 1
  np.testing.assert_array_equal(second["mask"], full)


# Mask pairing.


def test_flat_mask_shared_by_two_images_is_an_error(tmp_path, data_config):
  images, masks = tmp_path / "images", tmp_path / "masks"
  data_makers.write_image(images / "lineA" / "001.jpg", "jpeg")
  data_makers.write_image(images / "lineB" / "001.jpg", "jpeg")
  data_makers.write_mask(masks / "001.png")
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks)
  with pytest.raises(data.DataError) as error:
    data.load_split(config, "images", "test")
  message = str(error.value)
  assert str(masks / "001.png") in message
  assert "lineA/001.jpg" in message and "lineB/001.jpg" in message
  assert "mirror the image sub-folders" in message
  assert not list((tmp_path / "tfds").rglob("*.array_record*"))  # Refused before writing.


def test_mirrored_masks_pair_each_image_with_its_own(tmp_path, data_config):
  images, masks = tmp_path / "images", tmp_path / "masks"
  data_makers.write_image(images / "lineA" / "001.jpg", "jpeg")
  data_makers.write_image(images / "lineB" / "001.jpg", "jpeg")
  data_makers.write_image(images / "good" / "001.jpg", "jpeg")  # No mask: normal.
  want = data_makers.write_mask(masks / "lineA" / "001.png")
  data_makers.write_mask(masks / "lineB" / "001_mask.png", empty=True)
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks)
  split = data.load_split(config, "images", "test")
  by_name = {e["file_name"]: e for e in split}
  assert sorted(by_name) == ["good/001.jpg", "lineA/001.jpg", "lineB/001.jpg"]
  assert by_name["lineA/001.jpg"]["label"] == 1
  np.testing.assert_array_equal(by_name["lineA/001.jpg"]["mask"], want)
  assert by_name["lineB/001.jpg"]["label"] == 0
  # Masks in sub-folders pair by relative path only: good/001.jpg takes no other's mask.
  assert by_name["good/001.jpg"]["label"] == 0 and not by_name["good/001.jpg"]["mask"].any()
  assert split.unmasked == 1


def test_mask_in_a_sub_folder_is_not_taken_by_bare_name(tmp_path, data_config):
  images, masks = tmp_path / "images", tmp_path / "masks"
  data_makers.write_image(images / "good" / "000.png")
  data_makers.write_image(images / "broken" / "000.png")
  data_makers.write_mask(masks / "broken" / "000_mask.png")
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks)
  split = data.load_split(config, "images", "test")
  labels = {e["file_name"]: e["label"] for e in split}
  assert labels == {"broken/000.png": 1, "good/000.png": 0}
  assert split.unmasked == 1 and split.skipped == []


def test_link_into_the_mask_folder_is_left_out_of_the_images(tmp_path, data_config):
  images, masks = tmp_path / "images", tmp_path / "masks"
  data_makers.write_image(images / "a.png")
  data_makers.write_mask(masks / "a.png")
  data_makers.write_mask(masks / "sub" / "x.png")
  (images / "sub").symlink_to(masks / "sub", target_is_directory=True)
  data_makers.write_image(images / "sub_real" / "x.png")
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks)
  split = data.load_split(config, "images", "test")
  assert _names(split) == ["a.png", "sub_real/x.png"]


def test_flat_masks_still_pair_by_bare_name(tmp_path, data_config):
  images, masks = tmp_path / "images", tmp_path / "masks"
  data_makers.write_image(images / "lineA" / "001.png")
  data_makers.write_image(images / "lineB" / "002.png")
  data_makers.write_mask(masks / "001.png")
  data_makers.write_mask(masks / "002_mask.png")
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks)
  split = data.load_split(config, "images", "test")
  assert [e["label"] for e in split] == [1, 1]
  assert split.unmasked == 0 and split.skipped == []


def test_two_masks_for_one_image_is_an_error(tmp_path, data_config):
  images, masks = tmp_path / "images", tmp_path / "masks"
  data_makers.write_image(images / "a.png")
  data_makers.write_mask(masks / "a.png")
  data_makers.write_mask(masks / "a_mask.png")
  config = data_config(name="folder", path=images, data_dir=tmp_path / "tfds", mask_path=masks)
  with pytest.raises(data.DataError) as error:
    data.load_split(config, "images", "test")
  message = str(error.value)
  assert str(images / "a.png") in message
  assert str(masks / "a.png") in message and str(masks / "a_mask.png") in message

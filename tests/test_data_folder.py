"""Folder builder: images to score, optional references and masks paired by name."""

import os

import pytest

from maeday_jax import data
from tests import data_makers


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> data_makers.FakeDataset:
  return data_makers.make_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_category_is_the_folder_name(fake, data_dir, data_config):
  config = data_config(**data_makers.folder_fields(fake.root, data_dir))
  assert data.resolve_categories(config) == ["images"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_with_references_and_masks(fake, data_dir, split, data_config):
  config = data_config(**data_makers.folder_fields(fake.root, data_dir))
  loaded = data.load_split(config, "images", split)
  data_makers.check_split(loaded, fake)


def test_skip_reasons(fake, data_dir, data_config):
  config = data_config(**data_makers.folder_fields(fake.root, data_dir))
  reasons = dict(data.load_split(config, "images", "test").skipped)
  images, masks = fake.root / "images", fake.root / "masks"
  assert "truncated" in reasons[str(images / "e.png")]
  assert "not an image" in reasons[str(images / "readme.txt")]
  assert f"{masks / 'f.png'}: mask is 31x40" in reasons[str(images / "f.png")]
  assert "without a matching image" in reasons[str(masks / "orphan.png")]


def test_without_masks_labels_are_unknown(fake, data_dir, data_config):
  config = data_config(**data_makers.folder_fields(fake.root, data_dir, masks=False))
  loaded = data.load_split(config, "images", "test")
  assert len(loaded) == 5  # a, b, c, sub/d and f (its mask is not read).
  for example in loaded:
    assert example["label"] == -1 and example["defect_type"] == "unknown"
    assert not example["mask"].any()


def test_train_split_needs_normal_path(fake, data_dir, data_config):
  config = data_config(**data_makers.folder_fields(fake.root, data_dir, normal=False))
  with pytest.raises(data.DataError, match="normal_path"):
    data.load_split(config, "images", "train")


def test_two_folders_with_the_same_name_do_not_collide(tmp_path, data_config):
  for parent, count in (("one", 1), ("two", 2)):
    for i in range(count):
      data_makers.write_image(tmp_path / parent / "photos" / f"{i}.png")
  config = data_config(name="folder", data_dir=tmp_path / "tfds")
  lengths = []
  for parent in ("one", "two"):
    config.path = str(tmp_path / parent / "photos")
    lengths.append(len(data.load_split(config, "photos", "test")))
  assert lengths == [1, 2]


def test_rebuilt_when_the_files_change(tmp_path, data_config):
  folder = tmp_path / "photos"
  data_makers.write_image(folder / "a.png")
  config = data_config(name="folder", path=folder, data_dir=tmp_path / "tfds")
  assert len(data.load_split(config, "photos", "test")) == 1
  data_makers.write_image(folder / "b.png")
  assert len(data.load_split(config, "photos", "test")) == 2
  os.remove(folder / "a.png")
  assert [e["file_name"] for e in data.load_split(config, "photos", "test")] == ["b.png"]


def test_empty_folder_is_a_clear_error(tmp_path, data_config):
  (tmp_path / "empty").mkdir()
  config = data_config(name="folder", path=tmp_path / "empty", data_dir=tmp_path)
  with pytest.raises(data.DataError, match="contains no files"):
    data.load_split(config, "empty", "test")


def test_images_without_a_mask_are_counted(fake, data_dir, data_config):
  config = data_config(**data_makers.folder_fields(fake.root, data_dir))
  unmasked = data_config(**data_makers.folder_fields(fake.root, data_dir, masks=False))
  # c.png has no mask: it is scored as normal (label 0) and counted.
  assert data.load_split(config, "images", "test").unmasked == 1
  assert data.load_split(config, "images", "train").unmasked == 0
  assert data.load_split(unmasked, "images", "test").unmasked == 0

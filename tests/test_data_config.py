"""`config.data`: defaults, category selection and the errors for bad names and paths."""

import pytest

from maeday_jax import data
from maeday_jax.data.builders import mvtec_ad, visa


def test_defaults(monkeypatch):
  monkeypatch.delenv("MAEDAY_DATA_DIR", raising=False)
  config = data.get_data_config()
  assert config.name == "mvtec_ad" and config.path == "" and config.categories == "all"
  assert config.data_dir == "~/.cache/maeday_jax/tfds"
  assert config.normal_path == "" and config.mask_path == ""
  assert config.num_workers > 0 and config.prefetch >= 0
  assert data.DATASETS == ("mvtec_ad", "visa", "magnetic_tile", "folder", "btad", "kolektorsdd2")


def test_data_dir_from_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("MAEDAY_DATA_DIR", str(tmp_path))
  assert data.data_dir(data.get_data_config()) == tmp_path


def test_categories_accept_all_comma_string_and_list(data_config):
  assert data.resolve_categories(data_config()) == list(mvtec_ad.CATEGORIES)
  assert len(data.resolve_categories(data_config(name="visa"))) == 12
  assert data.resolve_categories(data_config(categories="wood, bottle")) == ["bottle", "wood"]
  assert data.resolve_categories(data_config(categories=["carpet"])) == ["carpet"]
  assert data.resolve_categories(data_config(name="visa", categories="pcb1")) == ["pcb1"]
  assert set(mvtec_ad.OBJECTS) | set(mvtec_ad.TEXTURES) == set(mvtec_ad.CATEGORIES)
  assert "pipe_fryum" in visa.CATEGORIES


def test_misspelled_category_names_it_and_lists_valid_ones(data_config):
  with pytest.raises(data.DataError, match="'botle'") as info:
    data.resolve_categories(data_config(categories="bottle,botle"))
  assert "Did you mean 'bottle'" in str(info.value) and "zipper" in str(info.value)
  with pytest.raises(data.DataError, match="empty"):
    data.resolve_categories(data_config(categories=" , "))


def test_unknown_dataset_lists_choices(data_config):
  known = "mvtec_ad, visa, magnetic_tile, folder, btad, kolektorsdd2"
  with pytest.raises(data.DataError, match=known):
    data.resolve_categories(data_config(name="mvtec"))


def test_path_defined_datasets_have_one_pseudo_category(tmp_path, data_config):
  folder = tmp_path / "line_3"
  folder.mkdir()
  assert data.resolve_categories(data_config(name="folder", path=str(folder))) == ["line_3"]
  assert data.resolve_categories(data_config(name="magnetic_tile", path=str(folder))) == [
    "magnetic_tile"
  ]
  with pytest.raises(data.DataError, match="'bottle'.*valid: all, line_3"):
    data.resolve_categories(data_config(name="folder", path=str(folder), categories="bottle"))


def test_empty_or_missing_path_is_a_clear_error(tmp_path, data_config):
  with pytest.raises(data.DataError, match="config.data.path is empty"):
    data.resolve_categories(data_config(name="folder"))
  with pytest.raises(data.DataError, match=f"config.data.path={tmp_path / 'nope'} does not exist"):
    data.load_split(data_config(path=tmp_path / "nope", data_dir=tmp_path), "bottle", "test")


def test_folder_train_split_needs_normal_path(tmp_path, data_config):
  with pytest.raises(data.DataError, match="normal_path"):
    data.load_split(data_config(name="folder", path=str(tmp_path)), "x", "train")

"""BTAD and KolektorSDD2 builders: layout, every field, labels, masks, skipped files."""

import collections
import importlib
import os

import numpy as np
import pytest

from maeday_jax import categories, data
from maeday_jax.data.builders import Btad, KolektorSdd2, base, btad, kolektorsdd2
from tests import data_makers

# The module (`maeday_jax.data.prepare` is also the name of its function there).
prepare = importlib.import_module("maeday_jax.data.prepare")


def test_registration_matches_the_category_lists():
  assert prepare._KINDS["btad"].builder is Btad
  assert prepare._KINDS["btad"].categories == btad.CATEGORIES
  assert prepare._KINDS["kolektorsdd2"].builder is KolektorSdd2
  assert prepare._KINDS["kolektorsdd2"].categories == kolektorsdd2.CATEGORIES
  assert Btad.name == "btad" and KolektorSdd2.name == "kolektorsdd2"
  assert [c.name for c in Btad.BUILDER_CONFIGS] == ["01", "02", "03"]
  assert categories.canonical_dataset("KSDD2") == "kolektorsdd2"
  assert btad.SHA256 is None and kolektorsdd2.SHA256 is None  # None is published.


# --- BTAD ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_btad(tmp_path_factory) -> data_makers.FakeDataset:
  return data_makers.make_btad(tmp_path_factory.mktemp("btad") / "BTech_Dataset_transformed")


@pytest.fixture(scope="module")
def btad_splits(fake_btad, tmp_path_factory, data_config):
  """Every product prepared once; the path is the parent of the extracted folder."""
  config = data_config(
    name="btad", path=fake_btad.root.parent, data_dir=tmp_path_factory.mktemp("tfds")
  )
  assert data.resolve_categories(config) == ["01", "02", "03"]
  return config, {
    (p, s): data.load_split(config, p, s) for p in ("01", "02", "03") for s in ("train", "test")
  }


def test_btad_every_field_and_skipped_file(fake_btad, btad_splits):
  _, splits = btad_splits
  for (product, split_name), split in splits.items():
    data_makers.check_split(split, fake_btad, product)
    assert split.dataset == "btad" and split.category == product
    assert len(split) == {"train": 3, "test": 4}[split_name]
    labels = collections.Counter(split[i]["label"] for i in range(len(split)))
    assert labels == ({0: 3} if split_name == "train" else {0: 2, 1: 2})


def test_btad_keeps_each_products_formats(btad_splits):
  _, splits = btad_splits
  for product, (image_suffix, _) in data_makers.BTAD_FORMATS.items():
    names = list(splits[product, "test"].file_names)
    assert names == sorted(names)
    assert all(n.endswith(image_suffix) for n in names), names
    assert {n.split("/")[1] for n in names} == {"ok", "ko"}


def test_btad_skip_reasons_name_the_files(fake_btad, btad_splits):
  _, splits = btad_splits
  for product, (image_suffix, mask_suffix) in data_makers.BTAD_FORMATS.items():
    folder = fake_btad.root / product
    reasons = dict(splits[product, "test"].skipped)
    assert "defect image without a mask" in reasons[str(folder / "test/ko" / f"0007{image_suffix}")]
    assert "0007" in reasons[str(folder / "test/ko" / f"0007{image_suffix}")]
    assert "mask is 40x30 (HxW)" in reasons[str(folder / "test/ko" / f"0008{image_suffix}")]
    assert "without its image" in reasons[str(folder / "ground_truth/ko" / f"0099{mask_suffix}")]
    train = dict(splits[product, "train"].skipped)
    assert "not an image" in train[str(folder / "train/ok/notes.txt")]


def test_btad_ko_image_without_a_mask_is_a_data_error_naming_it(fake_btad):
  plan = btad.plan_product(fake_btad.root / "01")
  (item,) = [i for i in plan["test"] if i.file_name == "test/ko/0007.bmp"]
  with pytest.raises(data.DataError) as info:
    base.make_example(item)
  assert info.value.path == str(fake_btad.root / "01" / "test/ko/0007.bmp")
  assert str(fake_btad.root / "01" / "test/ko/0007.bmp") in str(info.value)
  assert "without a mask" in info.value.reason


def test_btad_batches_through_the_pipeline(btad_splits):
  _, splits = btad_splits
  split = splits["01", "test"]
  got = list(data.batches(split, 3, 16, shard_index=0, shard_count=1, num_workers=1))
  labels = np.concatenate([b["label"][b["valid"]] for b in got])
  assert sorted(labels.tolist()) == [0, 0, 1, 1]
  masks = np.concatenate([b["mask"][b["valid"]] for b in got])
  assert masks.shape == (4, 16, 16) and masks[labels == 1].any() and not masks[labels == 0].any()


def test_btad_missing_product_lists_the_ones_found(fake_btad, tmp_path, data_config):
  root = tmp_path / "only01"
  data_makers.make_btad(root, products=("01",))
  config = data_config(name="btad", path=root, data_dir=tmp_path / "tfds")
  with pytest.raises(data.DataError, match="'02' is missing.*found.*: 01"):
    data.load_split(config, "02", "test")


def test_btad_unknown_product(fake_btad, tmp_path, data_config):
  config = data_config(name="btad", path=fake_btad.root, data_dir=tmp_path)
  with pytest.raises(data.DataError, match="Unknown btad category '04'"):
    data.load_split(config, "04", "test")


@pytest.mark.parametrize("path", ["", "empty", "btad.zip"])
def test_btad_needs_the_extracted_folder(tmp_path, data_config, path):
  if path:
    (tmp_path / "empty").mkdir()
    (tmp_path / "btad.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    path = tmp_path / path
  config = data_config(name="btad", path=path, data_dir=tmp_path / "tfds")
  with pytest.raises(data.DataError, match="extract btad.zip") as info:
    data.load_split(config, "01", "test")
  assert btad.URL in str(info.value)


def test_btad_file_names_that_are_not_utf8(tmp_path, data_config):
  folder = tmp_path / "btad" / "03"
  want = data_makers.write_image(folder / "train/ok/0000.png")
  image = data_makers.write_image(folder / "test/ko/a.png")
  mask = data_makers.write_mask(folder / "ground_truth/ko/a.png")
  ko = os.path.join(os.fsencode(folder), b"test/ko/bad\xff.bmp")
  gt = os.path.join(os.fsencode(folder), b"ground_truth/ko/bad\xff.bmp")
  for source, target in ((folder / "test/ko/a.png", ko), (folder / "ground_truth/ko/a.png", gt)):
    os.rename(source, target)  # PNG bytes under a .bmp name: decoded by content.
  os.rename(folder / "train/ok/0000.png", os.path.join(os.fsencode(folder), b"train/ok/\xe9.png"))
  config = data_config(name="btad", path=tmp_path / "btad", data_dir=tmp_path / "tfds")
  for _ in range(2):  # Prepared, then reused.
    test = data.load_split(config, "03", "test")
    assert list(test.file_names) == ["test/ko/bad\\xff.bmp"] and not test.skipped
    np.testing.assert_array_equal(test[0]["image"], image)
    np.testing.assert_array_equal(test[0]["mask"], mask)
    train = data.load_split(config, "03", "train")
    assert list(train.file_names) == ["train/ok/\\xe9.png"] and not train.skipped
    np.testing.assert_array_equal(train[0]["image"], want)


# --- KolektorSDD2 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_ksdd2(tmp_path_factory) -> data_makers.FakeDataset:
  return data_makers.make_kolektorsdd2(tmp_path_factory.mktemp("ksdd2") / "KolektorSDD2")


@pytest.fixture(scope="module")
def ksdd2_splits(fake_ksdd2, tmp_path_factory, data_config):
  config = data_config(
    name="kolektorsdd2", path=fake_ksdd2.root, data_dir=tmp_path_factory.mktemp("tfds")
  )
  assert data.resolve_categories(config) == ["kolektorsdd2"]
  return config, {s: data.load_split(config, "kolektorsdd2", s) for s in ("train", "test")}


def test_ksdd2_every_field_and_skipped_file(fake_ksdd2, ksdd2_splits):
  _, splits = ksdd2_splits
  for split in splits.values():
    data_makers.check_split(split, fake_ksdd2)
    assert split.dataset == "kolektorsdd2" and split.category == "kolektorsdd2"
    assert split.unmasked == 0
  assert [splits["test"][i]["label"] for i in range(len(splits["test"]))] == [0, 0, 1, 1]
  assert {splits["train"][i]["label"] for i in range(len(splits["train"]))} == {0}


def test_ksdd2_train_leaves_out_defective_images(fake_ksdd2, ksdd2_splits):
  config, splits = ksdd2_splits
  assert "train/10003.png" not in splits["train"].file_names
  assert all("10003" not in path for path, _ in splits["train"].skipped)
  builder = prepare.prepare(config, "kolektorsdd2")
  assert list(builder.info.metadata["train_anomalies_left_out"]) == ["train/10003.png"]


def test_ksdd2_skip_reasons_name_the_files(fake_ksdd2, ksdd2_splits):
  _, splits = ksdd2_splits
  root = fake_ksdd2.root
  reasons = dict(splits["test"].skipped)
  assert "without its ground-truth mask" in reasons[str(root / "test/20007.png")]
  assert str(root / "test/20007_GT.png") in reasons[str(root / "test/20007.png")]
  assert "mask is 32x40 (HxW)" in reasons[str(root / "test/20008.png")]
  assert "without its image" in reasons[str(root / "test/20099_GT.png")]
  assert (
    "without its ground-truth mask" in dict(splits["train"].skipped)[str(root / "train/10004.png")]
  )
  item = next(i for i in kolektorsdd2.plan_split(root, "test") if i.file_name == "test/20007.png")
  with pytest.raises(data.DataError) as info:
    base.make_example(item)
  assert info.value.path == str(root / "test/20007.png")


def test_ksdd2_batches_through_the_pipeline(ksdd2_splits):
  _, splits = ksdd2_splits
  got = list(data.batches(splits["test"], 4, 16, shard_index=0, shard_count=1, num_workers=1))
  assert [b["label"].tolist() for b in got] == [[0, 0, 1, 1]]
  assert got[0]["mask"][2:].any() and not got[0]["mask"][:2].any()


def test_ksdd2_path_may_be_above_the_extracted_folder(fake_ksdd2, tmp_path, data_config):
  config = data_config(
    name="kolektorsdd2", path=fake_ksdd2.root.parent.parent, data_dir=tmp_path / "tfds"
  )
  data_makers.check_split(data.load_split(config, "kolektorsdd2", "test"), fake_ksdd2)


@pytest.mark.parametrize("path", ["", "empty", "KolektorSDD2.zip"])
def test_ksdd2_needs_the_extracted_folder(tmp_path, data_config, path):
  if path:
    (tmp_path / "empty" / "train").mkdir(parents=True)  # No test/, no ground truth.
    (tmp_path / "KolektorSDD2.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    path = tmp_path / path
  config = data_config(name="kolektorsdd2", path=path, data_dir=tmp_path / "tfds")
  with pytest.raises(data.DataError, match="extract it"):
    data.load_split(config, "kolektorsdd2", "test")


def test_ksdd2_file_names_that_are_not_utf8(tmp_path, data_config):
  root = tmp_path / "ksdd2"
  image = data_makers.write_image(root / "test/a.png")
  mask = data_makers.write_mask(root / "test/a_GT.png")
  data_makers.write_image(root / "train/0.png")
  data_makers.write_mask(root / "train/0_GT.png", empty=True)
  raw = os.fsencode(root / "test")
  os.rename(root / "test/a.png", os.path.join(raw, b"\xff.png"))
  os.rename(root / "test/a_GT.png", os.path.join(raw, b"\xff_GT.png"))
  config = data_config(name="kolektorsdd2", path=root, data_dir=tmp_path / "tfds")
  for _ in range(2):
    test = data.load_split(config, "kolektorsdd2", "test")
    assert list(test.file_names) == ["test/\\xff.png"] and not test.skipped
    assert test[0]["label"] == 1 and test[0]["defect_type"] == "anomaly"
    np.testing.assert_array_equal(test[0]["image"], image)
    np.testing.assert_array_equal(test[0]["mask"], mask)


def test_ksdd2_is_root_needs_ground_truth(tmp_path):
  (tmp_path / "train").mkdir()
  (tmp_path / "test").mkdir()
  assert not kolektorsdd2.is_root(tmp_path)
  (tmp_path / "train" / "1_GT.png").write_bytes(b"")
  assert kolektorsdd2.is_root(tmp_path)

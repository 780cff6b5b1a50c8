"""Magnetic tile builder: layout, deterministic split, and the real sample when present."""

import collections

import pytest

from maeday_jax import data
from maeday_jax.data.builders import magnetic_tile
from tests import data_makers


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> data_makers.FakeDataset:
  return data_makers.make_magnetic_tile(tmp_path_factory.mktemp("mt") / "Magnetic-tile-defect")


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_field_and_skipped_file(fake, tmp_path, split, data_config):
  config = data_config(name="magnetic_tile", path=fake.root, data_dir=tmp_path)
  loaded = data.load_split(config, "magnetic_tile", split)
  data_makers.check_split(loaded, fake)
  if split == "test":
    reasons = " ".join(r for _, r in loaded.skipped)
    assert "defect image without a mask" in reasons and "mask is 10x10" in reasons


def test_split_rule_is_a_stable_hash_of_the_file_name():
  names = [f"exp{i}_num_{i * 7}.jpg" for i in range(400)]
  train = [n for n in names if magnetic_tile.is_train_normal(n)]
  assert 160 < len(train) < 240  # About half.
  assert train == [n for n in names if magnetic_tile.is_train_normal(n)]


def test_path_must_hold_the_layout(tmp_path, data_config):
  config = data_config(name="magnetic_tile", path=tmp_path, data_dir=tmp_path / "tfds")
  with pytest.raises(data.DataError, match="does not hold the magnetic tile layout"):
    data.load_split(config, "magnetic_tile", "test")


def test_real_sample_counts_per_class(mt_sample_dir, tmp_path, data_config):
  config = data_config(name="magnetic_tile", path=mt_sample_dir, data_dir=tmp_path)
  counts = {}
  for split in ("train", "test"):
    loaded = data.load_split(config, "magnetic_tile", split)
    assert loaded.skipped == []
    counts[split] = collections.Counter(
      loaded.file_name(i).split("/")[0] for i in range(len(loaded))
    )
  # 40 MT_Free split by the hash rule (16 / 24), 8 images of each defect class in test.
  assert counts["train"] == {"MT_Free": 16}
  assert counts["test"] == {"MT_Free": 24, **{c: 8 for c in magnetic_tile.DEFECT_CLASSES}}
  example = data.load_split(config, "magnetic_tile", "test")[30]
  assert example["label"] == 1 and example["mask"].any() and example["image"].shape[2] == 3

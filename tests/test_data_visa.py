"""VisA builder: the official 1-class split CSV, masks non-zero = anomalous, bad rows."""

import pytest

from maeday_jax import data
from tests import data_makers


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> data_makers.FakeDataset:
  return data_makers.make_visa(tmp_path_factory.mktemp("visa") / "VisA_20220922")


@pytest.fixture(scope="module")
def config(fake, tmp_path_factory, data_config):
  return data_config(name="visa", path=fake.root, data_dir=tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("category", ["candle", "pcb1"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_field_and_skipped_row(fake, config, category, split):
  loaded = data.load_split(config, category, split)
  data_makers.check_split(loaded, fake, category)
  assert len(loaded) == {"train": 2, "test": 3}[split]


def test_skip_reasons(fake, config):
  reasons = dict(data.load_split(config, "candle", "test").skipped)
  root = fake.root / "candle" / "Data" / "Images"
  assert "without a mask" in reasons[str(root / "Anomaly" / "010.JPG")]
  assert "cannot read file" in reasons[str(root / "Normal" / "0011.JPG")]
  ((path, reason),) = data.load_split(config, "candle", "train").skipped
  assert path == str(root / "Normal" / "0010.JPG") and "truncated" in reason


def test_file_names_are_relative_to_the_category(config):
  names = [s.file_name(i) for s in [data.load_split(config, "pcb1", "test")] for i in range(len(s))]
  assert names == sorted(names) and all(n.startswith("Data/Images/") for n in names)


def test_category_absent_from_the_csv(config):
  with pytest.raises(data.DataError, match="no rows for the VisA category 'pcb4'"):
    data.load_split(config, "pcb4", "test")

"""MVTec AD builder: layout, every field, skipped files, download and manual archives."""

import dataclasses
import hashlib
import pathlib

import pytest

from maeday_jax import data
from maeday_jax.data.builders import mvtec_ad
from tests import data_makers


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> data_makers.FakeDataset:
  return data_makers.make_mvtec(tmp_path_factory.mktemp("mvtec") / "mvtec_anomaly_detection")


@pytest.fixture(scope="module")
def archive(fake, tmp_path_factory) -> pathlib.Path:
  path = tmp_path_factory.mktemp("archive") / "mvtec_anomaly_detection.tar.xz"
  return data_makers.make_tar(fake.root, path, "mvtec_anomaly_detection")


@pytest.fixture(scope="module")
def prepared(fake, tmp_path_factory, data_config):
  """Both categories prepared once from the extracted copy."""
  config = data_config(path=fake.root, data_dir=tmp_path_factory.mktemp("tfds"), categories="all")
  return config, {
    (c, s): data.load_split(config, c, s) for c in ("bottle", "carpet") for s in ("train", "test")
  }


def test_every_field_and_skipped_file(fake, prepared):
  _, splits = prepared
  for (category, _), split in splits.items():
    data_makers.check_split(split, fake, category)
    assert split.dataset == "mvtec_ad" and split.category == category
  assert len(splits["bottle", "train"]) == 5 and len(splits["bottle", "test"]) == 5
  reasons = dict(splits["bottle", "test"].skipped)
  test_dir = fake.root / "bottle" / "test" / "broken"
  assert "without a mask" in reasons[str(test_dir / "002.png")]
  assert "mask is 40x30 (HxW) but its image is 30x40" in reasons[str(test_dir / "003.png")]
  assert "not an image" in reasons[str(test_dir / "004.png")]
  summary = data.skipped_summary(splits.values())
  assert "mvtec_ad/bottle/test: 3 file(s) skipped" in summary and "005.png" in summary


def test_prepared_data_is_reused_with_its_skip_list(prepared):
  config, splits = prepared
  files = sorted(data.data_dir(config).glob("mvtec_ad/bottle/*/*array_record*"))
  stamps = [f.stat().st_mtime_ns for f in files]
  config.path = ""  # No raw copy needed once prepared.
  again = data.load_split(config, "bottle", "test")
  assert [f.stat().st_mtime_ns for f in files] == stamps
  assert again.skipped == splits["bottle", "test"].skipped


def test_path_may_be_the_parent_of_the_extracted_folder(fake, tmp_path, data_config):
  split = data.load_split(data_config(path=fake.root.parent, data_dir=tmp_path), "carpet", "train")
  data_makers.check_split(split, fake, "carpet")


def test_missing_category_lists_the_ones_found(fake, tmp_path, data_config):
  with pytest.raises(data.DataError, match="'cable' is missing.*found.*bottle, carpet"):
    data.load_split(data_config(path=fake.root, data_dir=tmp_path), "cable", "test")


def test_folder_without_the_layout_says_what_it_expected(tmp_path, data_config):
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError, match="neither an extracted MVTec AD copy.*manual_dir"):
    data.load_split(
      data_config(path=tmp_path / "empty", data_dir=tmp_path / "tfds"), "bottle", "test"
    )


def test_manual_archive_is_verified_and_extracted(
  fake, archive, tmp_path, monkeypatch, data_config
):
  digest = hashlib.sha256(archive.read_bytes()).hexdigest()
  monkeypatch.setattr(mvtec_ad, "ARCHIVE", dataclasses.replace(mvtec_ad.ARCHIVE, sha256=digest))
  split = data.load_split(data_config(path=archive, data_dir=tmp_path), "bottle", "test")
  data_makers.check_split(split, fake, "bottle")
  # A folder holding the archive works too, and reuses the extraction.
  split = data.load_split(data_config(path=archive.parent, data_dir=tmp_path), "carpet", "test")
  data_makers.check_split(split, fake, "carpet")


def test_manual_archive_with_wrong_checksum_is_refused(archive, tmp_path, data_config):
  with pytest.raises(data.DownloadError, match="does not match the published MVTec AD archive"):
    data.load_split(data_config(path=archive, data_dir=tmp_path), "bottle", "test")


@pytest.fixture
def server(archive, file_server):
  """The archive over HTTP, whole to every request (as from a plain static server)."""
  return file_server({archive.name: archive.read_bytes()}, ranges=False).url


def test_download_from_url_with_checksum(fake, archive, server, tmp_path, monkeypatch, data_config):
  digest = hashlib.sha256(archive.read_bytes()).hexdigest()
  url = f"{server}/{archive.name}"
  monkeypatch.setattr(
    mvtec_ad, "ARCHIVE", dataclasses.replace(mvtec_ad.ARCHIVE, url=url, sha256=digest)
  )
  split = data.load_split(data_config(path="", data_dir=tmp_path), "bottle", "train")
  data_makers.check_split(split, fake, "bottle")
  assert (tmp_path / "downloads" / archive.name).is_file()


def test_download_with_wrong_checksum_is_refused(
  archive, server, tmp_path, monkeypatch, data_config
):
  url = f"{server}/{archive.name}"
  monkeypatch.setattr(mvtec_ad, "ARCHIVE", dataclasses.replace(mvtec_ad.ARCHIVE, url=url))
  with pytest.raises(data.DownloadError, match="not the published"):
    data.load_split(data_config(path="", data_dir=tmp_path), "bottle", "train")
  assert not list((tmp_path / "downloads").glob("*.tar.xz*"))


def test_unreachable_url_explains_manual_download(tmp_path, monkeypatch, data_config):
  url = "http://127.0.0.1:9/mvtec_anomaly_detection.tar.xz"  # The discard port: refused.
  monkeypatch.setattr(mvtec_ad, "ARCHIVE", dataclasses.replace(mvtec_ad.ARCHIVE, url=url))
  with pytest.raises(data.DownloadError) as info:
    data.load_split(data_config(path="", data_dir=tmp_path), "bottle", "test")
  message = str(info.value)
  assert f"Could not download MVTec AD from {url}" in message
  assert "config.data.path" in message and "manual_dir" in message
  assert mvtec_ad.ARCHIVE.sha256 in message


def test_tensorflow_is_never_imported(prepared):
  import sys

  _, splits = prepared
  splits["bottle", "test"][0]
  assert "tensorflow" not in sys.modules

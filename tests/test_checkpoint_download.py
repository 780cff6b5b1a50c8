"""Known checkpoint names: download over HTTP (a local server), verify, convert, reuse."""

import hashlib

import numpy as np
import pytest

from maeday_jax import checkpoints


@pytest.fixture
def server(fixtures_dir, file_server):
  payload = (fixtures_dir / "mae_ref_a.pth").read_bytes()
  s = file_server({"mae_ref_a.pth": payload, "notes.pth": b"not a checkpoint at all"})
  s.payload = payload
  return s


def _register(monkeypatch, url, sha256=None, size=None):
  remote = checkpoints.RemoteFile(url, sha256=sha256, size=size)
  monkeypatch.setitem(checkpoints.KNOWN_CHECKPOINTS, "mae_test", remote)
  return remote


def test_download_verifies_converts_and_reuses_cache(server, monkeypatch, tmp_path, fixtures_dir):
  digest = hashlib.sha256(server.payload).hexdigest()
  _register(monkeypatch, f"{server.url}/mae_ref_a.pth", sha256=digest, size=len(server.payload))
  model, params = checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  io = np.load(fixtures_dir / "mae_ref_a_io.npz")
  pred = model.apply({"params": params}, io["images"], noise=io["noise"])
  np.testing.assert_allclose(pred, io["pred"], atol=1e-4, rtol=0)
  assert (tmp_path / "mae_ref_a.pth").read_bytes() == server.payload
  assert (tmp_path / "mae_test_orbax" / "mae_config.json").is_file()
  assert len(server.requests) == 1
  checkpoints.load_mae("mae_test", cache_dir=tmp_path)  # From the converted cache.
  assert len(server.requests) == 1
  assert not list(tmp_path.glob("*.part"))


def test_interrupted_transfer_is_deleted_and_reported(server, monkeypatch, tmp_path):
  _register(monkeypatch, f"{server.url}/truncated/mae_ref_a.pth")
  with pytest.raises(checkpoints.DownloadError, match="truncated|interrupted") as e:
    checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  assert "/truncated/mae_ref_a.pth" in str(e.value)
  assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_deleted_and_reported(server, monkeypatch, tmp_path):
  _register(monkeypatch, f"{server.url}/mae_ref_a.pth", sha256="0" * 64)
  with pytest.raises(checkpoints.DownloadError, match="SHA-256"):
    checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_downloaded_non_checkpoint_is_deleted(server, monkeypatch, tmp_path):
  _register(monkeypatch, f"{server.url}/notes.pth")
  with pytest.raises(checkpoints.CheckpointError, match="was deleted"):
    checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_offline_error_names_url_and_the_local_alternative(monkeypatch, tmp_path):
  url = "http://127.0.0.1:9/mae_visualize_vit_large.pth"  # Port 9 (discard): refused.
  _register(monkeypatch, url)
  with pytest.raises(checkpoints.DownloadError) as e:
    checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  message = str(e.value)
  assert url in message
  assert "--config.model.checkpoint=" in message and "load_mae(" in message


def test_a_stopped_download_is_resumed(server, monkeypatch, tmp_path):
  digest = hashlib.sha256(server.payload).hexdigest()
  _register(monkeypatch, f"{server.url}/mae_ref_a.pth", sha256=digest)
  (tmp_path / "mae_ref_a.pth.part").write_bytes(server.payload[:1000])
  checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  assert server.requests == [("/mae_ref_a.pth", "bytes=1000-", 206)]
  assert (tmp_path / "mae_ref_a.pth").read_bytes() == server.payload


def test_file_url(monkeypatch, tmp_path, fixtures_dir):
  _register(monkeypatch, (fixtures_dir / "mae_ref_b.pth").as_uri())
  model, _ = checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  assert model.patch_size == 14


def test_official_names_point_to_the_decoder_checkpoints():
  for name in ("mae_vit_base", "mae_vit_large", "mae_vit_huge", "mae_vit_large_ganloss"):
    url = checkpoints.KNOWN_CHECKPOINTS[name].url
    assert url.startswith("https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_")

"""Known checkpoint names: download over HTTP (a local server), verify, convert, reuse."""

import hashlib
import http.server
import threading

import numpy as np
import pytest

from maeday_jax import checkpoints


class _Server:
  """Serves fixture bytes on 127.0.0.1; `/truncated/...` stops half-way."""

  def __init__(self, files: dict[str, bytes]):
    self.files, self.requests = files, []
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        server.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        if name not in server.files:
          self.send_error(404)
          return
        body = server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path.startswith("/truncated/"):
          body = body[: len(body) // 2]
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(fixtures_dir):
  payload = (fixtures_dir / "mae_ref_a.pth").read_bytes()
  s = _Server({"mae_ref_a.pth": payload, "notes.pth": b"not a checkpoint at all"})
  s.payload = payload
  yield s
  s.close()


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


def test_file_url(monkeypatch, tmp_path, fixtures_dir):
  _register(monkeypatch, (fixtures_dir / "mae_ref_b.pth").as_uri())
  model, _ = checkpoints.load_mae("mae_test", cache_dir=tmp_path)
  assert model.patch_size == 14


def test_official_names_point_to_the_decoder_checkpoints():
  for name in ("mae_vit_base", "mae_vit_large", "mae_vit_huge", "mae_vit_large_ganloss"):
    url = checkpoints.KNOWN_CHECKPOINTS[name].url
    assert url.startswith("https://dl.fbaipublicfiles.com/mae/visualize/mae_visualize_vit_")

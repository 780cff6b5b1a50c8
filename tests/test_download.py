"""The shared downloader: resume with HTTP ranges, restart, size and SHA-256 checks, errors."""

import hashlib
import os
import subprocess
import sys

import pytest

from maeday_jax import checkpoints, data, download
from tests.conftest import REPO_ROOT

PAYLOAD = bytes(range(256)) * 4099  # About 1 MiB: more than one read chunk.
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
NAME = f"resnet18-{DIGEST[:8]}.pth"


@pytest.fixture
def server(file_server):
  return file_server({NAME: PAYLOAD})


@pytest.fixture
def server_without_ranges(file_server):
  return file_server({NAME: PAYLOAD}, ranges=False)


def _fetch(url, dest, **checks):
  return download.fetch(download.RemoteFile(url, **checks), dest, progress=False)


def _leftovers(folder):
  return sorted(p.name for p in folder.iterdir())


def test_fetch_checks_renames_and_reuses_without_network(server, tmp_path):
  dest = tmp_path / "cache" / NAME
  url = f"{server.url}/{NAME}"
  assert _fetch(url, dest, sha256=DIGEST, size=len(PAYLOAD)) == dest
  assert dest.read_bytes() == PAYLOAD and download.sha256_of(dest) == DIGEST
  assert _leftovers(dest.parent) == [NAME]
  assert server.requests == [(f"/{NAME}", None, 200)]
  # A complete file is returned as is: the URL is not even contacted.
  assert _fetch("http://127.0.0.1:9/unreachable.pth", dest, sha256=DIGEST) == dest


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
  dest = tmp_path / NAME
  (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD[:300_000])
  _fetch(f"{server.url}/{NAME}", dest, sha256=DIGEST, size=len(PAYLOAD))
  assert dest.read_bytes() == PAYLOAD
  assert server.requests == [(f"/{NAME}", "bytes=300000-", 206)]
  assert _leftovers(tmp_path) == [NAME]


def test_resume_digest_covers_the_bytes_already_there(server, tmp_path):
  """A `.part` that is not the file's own prefix fails the SHA-256 and is deleted."""
  (tmp_path / f"{NAME}.part").write_bytes(b"x" * 1000)
  with pytest.raises(download.DownloadError, match="SHA-256 .*not the published"):
    _fetch(f"{server.url}/{NAME}", tmp_path / NAME, sha256=DIGEST)
  assert server.requests == [(f"/{NAME}", "bytes=1000-", 206)]
  assert _leftovers(tmp_path) == []


def test_server_ignoring_range_restarts_from_zero(server_without_ranges, tmp_path):
  dest = tmp_path / NAME
  (tmp_path / f"{NAME}.part").write_bytes(b"x" * 1000)  # Not even a prefix: overwritten.
  _fetch(f"{server_without_ranges.url}/{NAME}", dest, sha256=DIGEST)
  assert dest.read_bytes() == PAYLOAD
  assert server_without_ranges.requests == [(f"/{NAME}", "bytes=1000-", 200)]
  assert _leftovers(tmp_path) == [NAME]


def test_part_file_past_the_end_restarts(server, tmp_path):
  """416 (range not satisfiable): the `.part` is dropped and the file fetched whole."""
  dest = tmp_path / NAME
  (tmp_path / f"{NAME}.part").write_bytes(b"x" * (len(PAYLOAD) + 10))
  _fetch(f"{server.url}/{NAME}", dest, sha256=DIGEST)
  assert dest.read_bytes() == PAYLOAD
  assert [status for _, _, status in server.requests] == [416, 200]


def test_sha256_prefix_pass_and_fail(server, tmp_path):
  url = f"{server.url}/{NAME}"
  prefix = download.sha256_prefix_from_name(url)
  assert prefix == DIGEST[:8]
  assert _fetch(url, tmp_path / "ok" / NAME, sha256_prefix=prefix).read_bytes() == PAYLOAD
  wrong = "0" * 8 if prefix != "0" * 8 else "1" * 8
  with pytest.raises(download.DownloadError, match=f"does not start with .*prefix {wrong}"):
    _fetch(url, tmp_path / "bad" / NAME, sha256_prefix=wrong)
  assert _leftovers(tmp_path / "bad") == []


def test_sha256_prefix_from_name():
  assert download.sha256_prefix_from_name("resnet18-f37072fd.pth") == "f37072fd"
  assert download.sha256_prefix_from_name("vit_b_16_swag-9ac1b537.pth") == "9ac1b537"
  url = "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"
  assert download.sha256_prefix_from_name(url) == "95faca4d"
  for name in ("mae_visualize_vit_large.pth", "resnet-50.pth", "model-v2.pth", "abc-.pth"):
    assert download.sha256_prefix_from_name(name) is None


def test_remote_file_normalizes_and_checks_digests():
  remote = download.RemoteFile("https://x/y/resnet18-F37072FD.pth", sha256_prefix="F37072FD")
  assert remote.sha256_prefix == "f37072fd" and remote.filename == "resnet18-F37072FD.pth"
  with pytest.raises(ValueError, match="sha256="):
    download.RemoteFile("https://x/y.pth", sha256="abc")
  with pytest.raises(TypeError):
    download.RemoteFile("https://x/y.pth", DIGEST)  # The checks are keyword-only.


def test_size_checks(server, tmp_path):
  url = f"{server.url}/{NAME}"
  with pytest.raises(download.DownloadError, match="were expected \\(too long\\)"):
    _fetch(url, tmp_path / NAME, size=len(PAYLOAD) - 1)
  with pytest.raises(download.DownloadError, match="announced by the server") as e:
    _fetch(f"{server.url}/truncated/{NAME}", tmp_path / NAME)
  assert f"/truncated/{NAME}" in str(e.value)
  assert _leftovers(tmp_path) == []


def test_file_url(tmp_path):
  source = tmp_path / "source" / NAME
  source.parent.mkdir()
  source.write_bytes(PAYLOAD)
  dest = tmp_path / "cache" / NAME
  dest.parent.mkdir()
  (dest.parent / f"{NAME}.part").write_bytes(PAYLOAD[:10])  # file URLs ignore ranges.
  _fetch(source.as_uri(), dest, sha256=DIGEST, sha256_prefix=DIGEST[:8], size=len(PAYLOAD))
  assert dest.read_bytes() == PAYLOAD
  assert _leftovers(dest.parent) == [NAME]
  with pytest.raises(download.DownloadError, match="Could not download"):
    _fetch((tmp_path / "missing.pth").as_uri(), tmp_path / "missing.pth.copy")


def test_offline_error_names_the_url_and_the_hint(tmp_path):
  url = "http://127.0.0.1:9/weights/resnet18-f37072fd.pth"  # Port 9 (discard): refused.
  hint = "Pass a local copy with --weights=/path/resnet18-f37072fd.pth."
  with pytest.raises(download.DownloadError) as e:
    download.fetch(download.RemoteFile(url), tmp_path / "w.pth", what="ResNet-18", hint=hint)
  message = str(e.value)
  assert f"Could not download ResNet-18 from {url}" in message
  assert message.endswith(hint)
  assert _leftovers(tmp_path) == []


def test_http_error_is_reported_with_its_status(server, tmp_path):
  url = f"{server.url}/missing.pth"
  with pytest.raises(download.DownloadError, match="HTTP 404") as e:
    download.fetch(download.RemoteFile(url), tmp_path / "m.pth", hint="Use a local copy.")
  assert url in str(e.value) and str(e.value).endswith("Use a local copy.")


def test_one_error_class_shared_by_checkpoints_and_data():
  assert checkpoints.DownloadError is download.DownloadError
  assert data.DownloadError is download.DownloadError
  assert not issubclass(download.DownloadError, OSError)


_FAILING_JOB = """
import sys
from absl import app
from maeday_jax import download, main

class Job:
  @staticmethod
  def run(config, workdir):
    raise download.DownloadError("Could not download http://127.0.0.1:9/w.pth (refused).")

main._job = lambda name: Job
app.run(main.main, argv=["main", "--config", sys.argv[1], "--workdir", sys.argv[2]])
"""


def test_command_line_reports_download_errors_without_traceback(tmp_path):
  config = tmp_path / "config.py"
  config.write_text(
    "import ml_collections\n\n\ndef get_config():\n"
    "  return ml_collections.ConfigDict({'job': 'fake'})\n"
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO_ROOT)}
  result = subprocess.run(
    [sys.executable, "-c", _FAILING_JOB, str(config), str(tmp_path / "run")],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr
  assert "error: Could not download http://127.0.0.1:9/w.pth" in result.stderr
  assert "Traceback" not in result.stderr

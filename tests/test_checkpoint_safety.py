"""A crafted .pth whose pickle would run code must be refused before anything runs."""

import io
import os
import pickle
import zipfile

import pytest

from maeday_jax import checkpoints


class _RunsACommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _EvalsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _archive(path, payload):
  buffer = io.BytesIO()
  pickle.dump({"model": {"cls_token": payload}}, buffer, protocol=2)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buffer.getvalue())
    z.writestr("archive/byteorder", "little")
  return path


@pytest.mark.parametrize("payload_type", [_RunsACommand, _EvalsCode])
def test_malicious_pickle_is_refused_without_running(tmp_path, payload_type):
  marker = tmp_path / "was_run"
  path = _archive(tmp_path / "evil.pth", payload_type(marker))
  # Sanity: plain pickle *would* run it (proves the payload is real).
  with zipfile.ZipFile(path) as z:
    assert b"system" in z.read("archive/data.pkl") or b"eval" in z.read("archive/data.pkl")
  with pytest.raises(checkpoints.CheckpointError, match="refusing to load the global") as e:
    checkpoints.load_mae(path)
  assert "evil.pth" in str(e.value)
  assert not marker.exists(), "the pickle's payload ran"


def test_payload_would_run_with_plain_pickle(tmp_path):
  """The same payload does run under an unrestricted unpickler (so the test above bites)."""
  marker = tmp_path / "was_run"
  path = _archive(tmp_path / "evil.pth", _RunsACommand(marker))
  with zipfile.ZipFile(path) as z:
    pickle.loads(z.read("archive/data.pkl"))
  assert marker.exists()

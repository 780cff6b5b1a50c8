"""Converted (Orbax) checkpoints, the conversion tool, and clear errors for bad inputs."""

import pickle
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from maeday_jax import checkpoints
from tests.conftest import REPO_ROOT


def test_convert_tool_then_load_is_equal(fixtures_dir, tmp_path):
  out = tmp_path / "converted"
  result = subprocess.run(
    [sys.executable, "tools/convert_checkpoint.py", str(fixtures_dir / "mae_ref_b.pth"), str(out)],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr
  io = np.load(fixtures_dir / "mae_ref_b_io.npz")
  model, params = checkpoints.load_mae(out)
  assert (model.patch_size, model.depth) == (14, 3)
  pred = model.apply({"params": params}, io["images"], noise=io["noise"])
  np.testing.assert_allclose(pred, io["pred"], atol=1e-4, rtol=0)


def test_convert_refuses_to_overwrite(fixtures_dir, tmp_path):
  (tmp_path / "x").mkdir()
  (tmp_path / "x" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="not empty"):
    checkpoints.convert(fixtures_dir / "mae_ref_b.pth", tmp_path / "x")


def test_encoder_only_checkpoint_is_explained(fixtures_dir):
  with pytest.raises(checkpoints.CheckpointError, match="no decoder") as e:
    checkpoints.load_mae(fixtures_dir / "mae_ref_encoder_only.pth")
  assert "mae_visualize" in str(e.value) and "mae_ref_encoder_only.pth" in str(e.value)


def _write_pth(path, state):
  """A minimal PyTorch-format zip archive written without PyTorch (float32 tensors)."""

  class Storage:  # Pickled as the global torch.FloatStorage.
    pass

  Storage.__module__, Storage.__qualname__ = "torch", "FloatStorage"

  class Tensor:
    def __init__(self, key, shape):
      self.key, self.shape = key, shape

    def __reduce__(self):
      strides = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
      return (_rebuild, (self.key, 0, self.shape, strides, False, {}))

  def _rebuild(*args):  # Pickled by reference as torch._utils._rebuild_tensor_v2.
    raise AssertionError

  _rebuild.__module__, _rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"

  class Pickler(pickle._Pickler):  # The Python pickler lets us name torch's globals.
    def save_global(self, obj, name=None):
      self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode())
      self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, type: save_global, types.FunctionType: save_global}

    def persistent_id(self, obj):
      if isinstance(obj, str) and obj.startswith("storage:"):
        key = obj.split(":")[1]
        return ("storage", Storage, key, "cpu", int(state_sizes[key]))
      return None

  def reducer_for(tensor_key):
    return f"storage:{tensor_key}"

  state_sizes = {str(i): np.asarray(v).size for i, v in enumerate(state.values())}
  objects = {}
  for i, (name, value) in enumerate(state.items()):
    t = Tensor(reducer_for(str(i)), tuple(np.shape(value)))
    objects[name] = t
  import io

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump({"model": objects})
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buffer.getvalue())
    z.writestr("archive/byteorder", "little")
    for i, value in enumerate(state.values()):
      z.writestr(f"archive/data/{i}", np.asarray(value, "<f4").tobytes())
  return path


def test_shape_mismatch_and_unknown_keys_are_listed(fixtures_dir, tmp_path):
  state = checkpoints.read_state_dict(fixtures_dir / "mae_ref_b.pth")
  state["blocks.0.mlp.fc2.bias"] = np.zeros(7, np.float32)
  state["extra.head.weight"] = np.zeros((2, 2), np.float32)
  del state["decoder_norm.bias"]
  path = _write_pth(tmp_path / "bad.pth", state)
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.load_mae(path)
  message = str(e.value)
  assert "bad.pth" in message
  assert "missing keys: decoder_norm.bias" in message
  assert "unexpected keys: extra.head.weight" in message
  assert "blocks.0.mlp.fc2.bias: file (7,), model (64,)" in message


def test_hand_written_archive_reads_back(fixtures_dir, tmp_path):
  # Also proves `_write_pth` (used above) writes what PyTorch writes.
  state = checkpoints.read_state_dict(fixtures_dir / "mae_ref_b.pth")
  again = checkpoints.read_state_dict(_write_pth(tmp_path / "same.pth", state))
  assert set(again) == set(state)
  for key in state:
    np.testing.assert_array_equal(again[key], state[key])


@pytest.mark.parametrize(
  "content, match",
  [
    (b"hello, I am a text file\n", "not a checkpoint"),
    (b"", "not a checkpoint"),
    (b"PK\x03\x04 broken zip", "not a checkpoint"),
  ],
)
def test_non_checkpoint_files_are_refused(tmp_path, content, match):
  path = tmp_path / "notes.pth"
  path.write_bytes(content)
  with pytest.raises(checkpoints.CheckpointError, match=match):
    checkpoints.load_mae(path)


def test_missing_path_or_unknown_name(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="mae_vit_large"):
    checkpoints.load_mae(tmp_path / "nope.pth")
  with pytest.raises(checkpoints.CheckpointError, match="neither an existing path"):
    checkpoints.load_mae("mae_vit_gigantic")


def test_directory_that_is_not_converted(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="convert_checkpoint"):
    checkpoints.load_mae(tmp_path)


def test_corrupt_tensor_data_is_detected(fixtures_dir, tmp_path):
  raw = bytearray((fixtures_dir / "mae_ref_b.pth").read_bytes())
  raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # Inside a storage: CRC fails.
  path = tmp_path / "damaged.pth"
  path.write_bytes(bytes(raw))
  with pytest.raises(checkpoints.CheckpointError, match="damaged.pth"):
    checkpoints.load_mae(path)

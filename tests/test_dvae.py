"""The DALL-E dVAE encoder port: parity with OpenAI's `dall_e` package, its safe import.

The fixtures come from `tools/references/torch_dvae_reference.py`: a tiny public
`dall_e.Encoder` with random weights, saved as a whole module (like the published
`encoder.pkl`) and its logits for three images.
"""

import io
import os
import pickle
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maeday_jax.models import dvae, dvae_import, weights
from maeday_jax.weight_files import CheckpointError, torch_zip

TINY = dict(group_count=4, n_hid=8, n_blk_per_group=1, input_channels=3, vocab_size=64)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
  module, params = dvae_import.load(fixtures_dir / "dvae_ref_encoder.pkl", expected=TINY)
  return module, params, dict(np.load(fixtures_dir / "dvae_ref_io.npz"))


@pytest.fixture(scope="module")
def state(fixtures_dir):
  return torch_zip.load_module_state_dict(fixtures_dir / "dvae_ref_encoder.pkl")


def _rel_error(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_logits_and_tokens_match_the_public_code(reference):
  module, params, io_ = reference
  assert dvae.architecture(module) == TINY
  assert {int(io_[k]) for k in TINY} <= set(TINY.values())  # The fixture's architecture.
  logits_and_tokens = jax.jit(
    lambda p, x: (dvae.token_logits(p, module, x), dvae.tokens(p, module, x))
  )
  for size, grid in ((32, 4), (48, 6)):  # The grid is the image downsampled by 8.
    logits, codes = logits_and_tokens(params, io_[f"images_{size}"])
    expected = io_[f"logits_{size}"]
    assert logits.shape == expected.shape == (len(expected), grid, grid, 64)
    assert logits.dtype == jnp.float32
    assert _rel_error(logits, expected) < 1e-4, size
    assert codes.dtype == jnp.int32 and codes.shape == expected.shape[:-1]
    np.testing.assert_array_equal(codes, io_[f"tokens_{size}"])
    np.testing.assert_array_equal(codes, np.argmax(np.asarray(logits), -1))


def test_map_pixels_by_hand():
  x = jnp.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(dvae.map_pixels(x), [0.1, 0.3, 0.5, 0.9], rtol=1e-6)


def test_public_architecture_gives_a_14x14_grid_at_112px():
  module = dvae.DalleEncoder()  # The public defaults.
  assert dvae.architecture(module) == dvae.PUBLIC
  images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
  params = jax.eval_shape(module.init, jax.random.key(0), images)["params"]
  logits = jax.eval_shape(lambda p, x: dvae.token_logits(p, module, x), params, images)
  assert logits.shape == (2, 14, 14, 8192)
  shapes = dvae_import.expected_shapes(module)
  # The names and shapes of the published encoder's state dict.
  assert shapes["blocks.input.w"] == (256, 3, 7, 7)
  assert shapes["blocks.group_1.block_1.res_path.conv_1.w"] == (64, 256, 3, 3)
  assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
  assert "blocks.group_1.block_1.id_path.w" not in shapes  # Same width: the identity.
  assert shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1)
  assert len(shapes) == 2 * (1 + 4 * 2 * 4 + 3 + 1)  # w and b of every conv.


def test_module_file_reads_as_its_state_dict(state):
  assert list(state)[:2] == ["blocks.input.w", "blocks.input.b"]  # state_dict() order.
  assert list(state)[-1] == "blocks.output.conv.b"
  assert state["blocks.input.w"].shape == (8, 3, 7, 7)
  assert all(v.dtype == np.float32 for v in state.values())


def test_default_reader_refuses_a_module_file(fixtures_dir):
  with pytest.raises(CheckpointError, match="refusing to load the global 'dall_e") as e:
    torch_zip.load(fixtures_dir / "dvae_ref_encoder.pkl")
  assert "load_module_state_dict" in str(e.value)


def test_plain_state_dict_file_loads_the_same(reference, state, tmp_path):
  from safetensors.numpy import save_file

  path = tmp_path / "encoder.safetensors"
  save_file({"encoder." + k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
  module, params = dvae_import.load(path, expected=None)
  assert module == reference[0]
  jax.tree.map(np.testing.assert_array_equal, params, reference[1])


def test_architecture_mismatch_names_expected_and_found(state):
  with pytest.raises(CheckpointError, match="vocab_size 8192 expected, found 64") as e:
    dvae_import.from_state_dict(state, source="tiny.pkl")  # The public one by default.
  assert "n_hid 256 expected, found 8" in str(e.value) and "tiny.pkl" in str(e.value)
  with pytest.raises(CheckpointError, match="vocab_size 1024 expected, found 64"):
    dvae_import.from_state_dict(state, expected={"vocab_size": 1024})

  broken = dict(state)
  del broken["blocks.group_2.block_1.res_path.conv_3.b"]
  broken["blocks.group_2.block_1.extra.w"] = np.zeros((1,), np.float32)
  broken["blocks.group_3.block_1.id_path.w"] = np.zeros((32, 16, 3, 3), np.float32)
  with pytest.raises(CheckpointError) as e:
    dvae_import.from_state_dict(broken, expected=None)
  message = str(e.value)
  assert "missing keys: blocks.group_2.block_1.res_path.conv_3.b" in message
  assert "unexpected keys: blocks.group_2.block_1.extra.w" in message
  assert "blocks.group_3.block_1.id_path.w (32, 16, 3, 3) (expected (32, 16, 1, 1))" in message

  with pytest.raises(CheckpointError, match="'blocks.input.w' is missing"):
    dvae_import.from_state_dict({"w": np.zeros(3, np.float32)}, expected=None)


class _RunsACommand:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def _module_file(path, payload, cyclic=False):
  """A `torch.save(module)`-like zip whose module's attributes hold `payload` (and the
  module itself among its submodules, if `cyclic`)."""
  encoder = types.new_class("Encoder")  # Pickled as the global dall_e.encoder.Encoder.
  encoder.__module__, encoder.__qualname__ = "dall_e.encoder", "Encoder"
  module = encoder()
  children = {"me": module} if cyclic else {}
  module.__dict__.update(_parameters={}, _buffers={}, _modules=children, hook=payload)

  class Pickler(pickle._Pickler):  # The Python pickler lets us name a global dall_e lacks.
    def save_global(self, obj, name=None):
      if obj is encoder:
        self.write(pickle.GLOBAL + b"dall_e.encoder\nEncoder\n")
        self.memoize(obj)
      else:
        super().save_global(obj, name)

    dispatch = {**pickle._Pickler.dispatch, type: save_global}

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(module)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buffer.getvalue())
    z.writestr("archive/byteorder", "little")
  return path, buffer.getvalue()


def test_hostile_module_pickle_is_refused_before_it_runs(tmp_path):
  marker = tmp_path / "was_run"
  path, data = _module_file(tmp_path / "encoder.pkl", _RunsACommand(marker))
  assert b"dall_e.encoder\nEncoder" in data and b"system" in data  # The payload is real.
  for read in (torch_zip.load_module_state_dict, dvae_import.load):
    with pytest.raises(CheckpointError, match=r"refusing to load the global '(posix|os)\.system'"):
      read(path)
    assert not marker.exists(), "the pickle's payload ran"
  # Without the payload the same file is an (empty) module: the stand-ins work.
  harmless, _ = _module_file(tmp_path / "empty.pkl", "just a string")
  assert torch_zip.load_module_state_dict(harmless) == {}
  cyclic, _ = _module_file(tmp_path / "cyclic.pkl", None, cyclic=True)
  with pytest.raises(CheckpointError, match="module 'me' contains itself"):
    torch_zip.load_module_state_dict(cyclic)


def test_legacy_format_is_named(tmp_path):
  path = tmp_path / "old.pkl"
  path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest of the file")
  with pytest.raises(CheckpointError, match="legacy .* format.*state_dict"):
    dvae_import.load(path)


def test_public_weights_are_registered():
  entry = weights.KNOWN["dalle_encoder"]
  assert entry.url == "https://cdn.openai.com/dall-e/encoder.pkl" and entry.kind == "dvae"
  assert weights.cached_path("dalle_encoder", "/cache").as_posix() == "/cache/dvae/encoder.pkl"

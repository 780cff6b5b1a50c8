"""A crafted .pth whose pickle would run code must be refused before anything runs."""

import io
import os
import pickle
import zipfile

import numpy as np
import pytest

from maeday_jax import checkpoints
from maeday_jax.checkpoints import torch_zip


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


# Hostile archives built by hand: what a crafted or damaged .pth can declare, and must not
# turn into out-of-bounds reads, huge allocations or tracebacks.


class _Global:
  """Pickled as the GLOBAL opcode `module.name` (e.g. torch._utils._rebuild_tensor_v2)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle's REDUCE writer insists on a callable.
    raise AssertionError


class _Call:
  """Pickled as `func(*args)`: func, the args tuple, REDUCE."""

  def __init__(self, func, *args):
    self.func, self.args = func, args


class _Build:
  """Pickled as `obj` followed by `state` and BUILD (the pickle setting attributes)."""

  def __init__(self, obj, state):
    self.obj, self.state = obj, state


class _Storage:
  """Pickled as the persistent id ('storage', type, key, location, numel)."""

  def __init__(self, *fields):
    self.fields = fields


class _Pickler(pickle._Pickler):  # The Python pickler lets us write any opcode sequence.
  dispatch = dict(pickle._Pickler.dispatch)

  def persistent_id(self, obj):
    return obj.fields if isinstance(obj, _Storage) else None

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  def _save_call(self, obj):
    self.save(obj.func)
    self.save(obj.args)
    self.write(pickle.REDUCE)
    self.memoize(obj)  # A second use is a memo reference to the same object, as in torch.

  def _save_build(self, obj):
    self.save(obj.obj)
    self.save(obj.state)
    self.write(pickle.BUILD)

  dispatch[_Global] = _save_global
  dispatch[_Call] = _save_call
  dispatch[_Build] = _save_build


FLOAT = _Global("torch", "FloatStorage")
REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
HOOKS = _Call(_Global("collections", "OrderedDict"))


def _storage(key="0", numel=4, storage_type=FLOAT):
  return _Storage("storage", storage_type, key, "cpu", numel)


def _tensor(storage, offset, size, stride):
  return _Call(REBUILD, storage, offset, size, stride, False, HOOKS)


def _hostile(path, model, members=None, compress=False):
  """A .pth whose pickle is `{'model': model}` and whose storages hold `members`."""
  buffer = io.BytesIO()
  _Pickler(buffer, protocol=2).dump({"model": model})
  members = {"0": np.arange(4, dtype="<f4").tobytes()} if members is None else members
  method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", buffer.getvalue())
    z.writestr("archive/byteorder", "little")
    for key, data in members.items():
      z.writestr(f"archive/data/{key}", data, compress_type=method)
  return path


def _refused(path, *fragments):
  """Loads `path`, expecting a CheckpointError that names the file and each fragment."""
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.read_state_dict(path)
  message = str(e.value)
  assert path.name in message
  for fragment in fragments:
    assert fragment in message, message
  return message


def test_hand_assembled_tensors_read_back(tmp_path):
  """The helpers above write what PyTorch writes; views of all kinds come out right."""
  values = np.arange(12, dtype="<f4")
  model = {
    "plain": _tensor(_storage("0", 12), 0, (3, 4), (4, 1)),
    "offset": _tensor(_storage("0", 12), 5, (2, 3), (3, 1)),
    "transposed": _tensor(_storage("0", 12), 0, (4, 3), (1, 4)),
    "expanded": _tensor(_storage("0", 12), 2, (3, 2), (0, 1)),
    "scalar": _tensor(_storage("0", 12), 7, (), ()),
    "empty": _tensor(_storage("0", 12), 12, (0, 5), (5, 1)),
    "last": _tensor(_storage("0", 12), 11, (1, 1), (1, 1)),
  }
  state = checkpoints.read_state_dict(_hostile(tmp_path / "ok.pth", model, {"0": values.tobytes()}))
  np.testing.assert_array_equal(state["plain"], values.reshape(3, 4))
  np.testing.assert_array_equal(state["offset"], values[5:11].reshape(2, 3))
  np.testing.assert_array_equal(state["transposed"], values.reshape(3, 4).T)
  np.testing.assert_array_equal(state["expanded"], np.broadcast_to(values[2:4], (3, 2)))
  assert state["scalar"].shape == () and state["scalar"] == 7
  assert state["empty"].shape == (0, 5)
  np.testing.assert_array_equal(state["last"], [[11]])


@pytest.mark.parametrize(
  "offset, size, stride, match",
  [
    (0, (16,), (1,), "reaches element 15, but the storage holds 4"),  # Past the end.
    (3, (2,), (1,), "reaches element 4"),  # Starts inside, ends outside.
    (4, (1,), (1,), "reaches element 4"),  # Starts at the end.
    (0, (2, 2), (1, 3), "reaches element 4"),  # Strided past the end.
    (0, (2,), (1 << 40,), "reaches element 1099511627776"),  # Far away (a segfault).
    (-2, (2,), (1,), "storage offset -2 is not a non-negative integer"),
    (2, (2,), (-1,), "stride (-1,) is not a tuple of non-negative integers"),
    (0, (-1,), (1,), "size (-1,) is not a tuple of non-negative integers"),
  ],
)
def test_view_outside_its_storage_is_refused(tmp_path, offset, size, stride, match):
  path = _hostile(
    tmp_path / "outside.pth", {"cls_token": _tensor(_storage(), offset, size, stride)}
  )
  _refused(path, "tensor 'cls_token' (storage '0')", match)


def test_zero_stride_view_of_terabytes_is_refused_before_allocating(tmp_path):
  # One float viewed as 2^42 of them: 16 TiB if anything tried to allocate it.
  huge = _tensor(_storage("0", 1), 0, (1 << 22, 1 << 20), (0, 0))
  path = _hostile(tmp_path / "expand.pth", {"pos_embed": huge}, {"0": bytes(4)})
  message = _refused(path, "tensor 'pos_embed'", "4398046511104 elements", "MAX_TENSOR_ELEMENTS")
  assert str(torch_zip.MAX_TENSOR_ELEMENTS) in message


def test_many_views_over_the_memory_budget_are_refused(tmp_path, monkeypatch):
  # Each view is small enough on its own, but together they need more than the budget.
  monkeypatch.setattr(torch_zip, "MAX_TOTAL_BYTES", 1 << 20)
  model = {
    f"blocks.{i}.mlp.fc1.weight": _tensor(_storage("0", 256), 0, (256, 256), (0, 1))
    for i in range(8)
  }
  members = {"0": bytes(256 * 4)}
  _refused(_hostile(tmp_path / "budget.pth", model, members), "MAX_TOTAL_BYTES", "2098176 bytes")


def test_storage_member_larger_than_declared_is_refused_unread(tmp_path, monkeypatch):
  # 4 MiB of zeros deflate to a few kB: the member claims far more than the 4 floats the
  # pickle declares, and must be refused from its zip header, without being inflated.
  member = bytes(4 << 20)
  path = _hostile(
    tmp_path / "bomb.pth", {"cls_token": _tensor(_storage(), 0, (4,), (1,))}, {"0": member}, True
  )
  assert path.stat().st_size < 64 << 10
  opened = []
  real_open = zipfile.ZipFile.open
  monkeypatch.setattr(
    zipfile.ZipFile,
    "open",
    lambda self, name, *a, **k: (
      opened.append(getattr(name, "filename", name)) or real_open(self, name, *a, **k)
    ),
  )
  _refused(path, "tensor 'cls_token'", "'archive/data/0' is 4194304 bytes", "declares 4 elements")
  assert "archive/data/0" not in opened


def test_storage_member_over_the_memory_budget_is_refused(tmp_path, monkeypatch):
  # Pickle and member agree, but the storage alone exceeds the budget (a 2 MiB storage
  # behind a 4-element tensor here; a 3 GiB one with the default budget of 8 GiB x 2).
  monkeypatch.setattr(torch_zip, "MAX_TOTAL_BYTES", 1 << 20)
  model = {"cls_token": _tensor(_storage("0", 1 << 19), 0, (4,), (1,))}
  path = _hostile(tmp_path / "big.pth", model, {"0": bytes(2 << 20)}, compress=True)
  _refused(path, "MAX_TOTAL_BYTES", "the storage 'archive/data/0' of tensor 'cls_token'")


def test_storage_member_smaller_than_declared_is_refused(tmp_path):
  path = _hostile(tmp_path / "short.pth", {"norm.bias": _tensor(_storage("0", 8), 0, (8,), (1,))})
  _refused(path, "tensor 'norm.bias'", "16 bytes uncompressed", "declares 8 elements")


def test_missing_storage_member_is_refused(tmp_path):
  path = _hostile(tmp_path / "gone.pth", {"norm.bias": _tensor(_storage("7"), 0, (4,), (1,))})
  _refused(path, "tensor 'norm.bias'", "'archive/data/7' is missing")


def test_oversized_pickle_is_refused_unread(tmp_path, monkeypatch):
  monkeypatch.setattr(torch_zip, "MAX_PICKLE_BYTES", 64)
  path = _hostile(tmp_path / "long.pth", {"cls_token": _tensor(_storage(), 0, (4,), (1,))})
  _refused(path, "archive/data.pkl", "MAX_PICKLE_BYTES")


def test_storage_type_called_directly_is_refused(tmp_path):
  path = _hostile(tmp_path / "call.pth", {"cls_token": _Call(FLOAT, 4)})
  _refused(path, "tensor 'cls_token'", "calls torch.FloatStorage(...) directly")


def test_storage_type_call_outside_the_state_dict_is_refused(tmp_path):
  tensor = _Call(REBUILD, _storage(), 0, (4,), (1,), False, _Call(FLOAT))
  _refused(_hostile(tmp_path / "hooks.pth", {"cls_token": tensor}), "torch.FloatStorage(...)")


@pytest.mark.parametrize(
  "args, match",
  [
    ((_storage(), 0, (4,)), "got 3 arguments, expected 4 to 7"),
    ((_storage(), 0, (4,), (1,), False, HOOKS, None, None), "got 8 arguments"),
    ((4, 0, (4,), (1,)), "built from 4 instead of a storage"),
    ((_storage(), "0", (4,), (1,)), "storage offset '0' is not a non-negative integer"),
    ((_storage(), 0.0, (4,), (1,)), "storage offset 0.0"),
    ((_storage(), 0, (2.5,), (1,)), "size (2.5,) is not a tuple of non-negative integers"),
    ((_storage(), 0, 4, (1,)), "size 4 is not a tuple"),
    ((_storage(), 0, (True,), (1,)), "size (True,)"),
    ((_storage(), 0, (4,), ("1",)), "stride ('1',)"),
    ((_storage(), 0, (2, 2), (1,)), "differ in length"),
    ((_storage(), 0, (1,) * 40, (1,) * 40), "40 dimensions"),
  ],
)
def test_malformed_rebuild_arguments_are_refused(tmp_path, args, match):
  path = _hostile(tmp_path / "args.pth", {"decoder_pred.weight": _Call(REBUILD, *args)})
  _refused(path, "tensor 'decoder_pred.weight'", match)


@pytest.mark.parametrize(
  "storage, match",
  [
    (_storage(numel=-1), "storage '0': element count -1 is not a non-negative integer"),
    (_storage(numel=4.0), "storage '0': element count 4.0"),
    (_storage(numel="4"), "storage '0': element count '4'"),
    (_storage(key=("0",)), "storage key ('0',) in the pickle is not a string"),
    (_storage(storage_type="FloatStorage"), "storage '0': unsupported storage type"),
    (_Storage("storage", FLOAT, "0"), "unsupported persistent id"),
    (_Storage("module", FLOAT, "0", "cpu", 4), "unsupported persistent id"),
  ],
)
def test_malformed_storage_ids_are_refused(tmp_path, storage, match):
  path = _hostile(tmp_path / "pid.pth", {"cls_token": _tensor(storage, 0, (4,), (1,))})
  _refused(path, match)


def test_storage_declared_twice_differently_is_refused(tmp_path):
  model = {
    "a": _tensor(_storage("0", 4), 0, (4,), (1,)),
    "b": _tensor(_storage("0", 1 << 30), 0, (1 << 20,), (1,)),
  }
  _refused(_hostile(tmp_path / "twice.pth", model), "storage '0' is declared twice")


def test_unknown_storage_dtype_is_refused(tmp_path):
  storage = _storage(storage_type=_Global("torch", "ComplexFloatStorage"))
  path = _hostile(tmp_path / "complex.pth", {"cls_token": _tensor(storage, 0, (2,), (1,))})
  _refused(path, "tensor 'cls_token' (storage '0')", "torch.ComplexFloatStorage are not supported")


def test_unknown_storage_dtype_outside_the_state_dict_is_refused(tmp_path):
  hooks = _Call(_Global("collections", "OrderedDict"), [("h", _Global("torch", "QInt8Storage"))])
  tensor = _Call(REBUILD, _storage(), 0, (4,), (1,), False, hooks)
  _refused(_hostile(tmp_path / "qint.pth", {"cls_token": tensor}), "torch.QInt8Storage")


@pytest.mark.parametrize(
  "model, match",
  [
    # The pickle setting attributes of a tensor or of the rebuild function.
    ({"cls_token": _Build(_tensor(_storage(), 0, (4,), (1,)), {"args": ()})}, "sets attributes"),
    ({"cls_token": _Build(REBUILD, {"name": "x"})}, "sets attributes"),
    # A tensor as a dict key; the rebuild function or a storage type as a value.
    (
      _Call(_Global("collections", "OrderedDict"), [(_tensor(_storage(), 0, (4,), (1,)), 1)]),
      "as a dictionary key",
    ),
    ({"cls_token": REBUILD}, "tensor 'cls_token': the pickle stores torch._utils."),
    ({"cls_token": FLOAT}, "tensor 'cls_token': the pickle stores torch.FloatStorage"),
    # _rebuild_parameter with the wrong arguments.
    ({"cls_token": _Call(_Global("torch._utils", "_rebuild_parameter"))}, "got 0 arguments"),
    ({"cls_token": _Call(_Global("torch._utils", "_rebuild_parameter"), 3)}, "from 3, not a"),
  ],
)
def test_malformed_pickles_are_refused(tmp_path, model, match):
  _refused(_hostile(tmp_path / "odd.pth", model), match)


def test_truncated_pickle_is_refused(tmp_path):
  path = _hostile(tmp_path / "cut.pth", {"cls_token": _tensor(_storage(), 0, (4,), (1,))})
  with zipfile.ZipFile(path) as z:
    members = {name: z.read(name) for name in z.namelist()}
  with zipfile.ZipFile(path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data[: len(data) // 2] if name.endswith("data.pkl") else data)
  _refused(path, "corrupt PyTorch archive")


def test_nested_and_shared_tensors_are_found(tmp_path):
  """Tensors deep in containers, in tuples, and shared between keys all load."""
  shared = _tensor(_storage(), 1, (2,), (1,))
  model = {"a": shared, "b": [shared, (_tensor(_storage(), 0, (1,), (1,)),)]}
  loaded = torch_zip.load(_hostile(tmp_path / "nest.pth", model))["model"]
  np.testing.assert_array_equal(loaded["a"], [1, 2])
  assert loaded["b"][0] is loaded["a"]
  np.testing.assert_array_equal(loaded["b"][1][0], [0])

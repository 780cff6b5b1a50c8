"""Reads PyTorch `torch.save` zip archives without PyTorch, and without running code.

A `.pth` file is a zip archive holding `<prefix>/data.pkl` (a pickle) and one raw
little-endian buffer per storage in `<prefix>/data/<key>`. The pickle refers to the buffers
through persistent ids and rebuilds tensors with `torch._utils._rebuild_tensor_v2`.

Unpickling is code execution in disguise: a crafted pickle can call any importable
function. This reader resolves only the handful of globals a tensor archive needs (the
rebuild functions, storage types, `OrderedDict`) and refuses every other one *before*
anything is called, raising `CheckpointError` that names the file and the global.

A crafted or damaged archive can also describe tensors that do not fit their data: a view
that reaches past its storage, a storage whose zip member inflates to far more than the
pickle declares, a zero-stride view of terabytes. So loading takes two passes over the
pickle. The first builds placeholders for storages and tensors and reads no tensor data;
every tensor is then checked against its storage (offset, sizes and strides inside it, at
most `MAX_TENSOR_ELEMENTS` elements), every storage against its zip member (the member's
uncompressed size must be exactly what the pickle declares), and the memory they need
together against `MAX_TOTAL_BYTES`. Only then are the storages read, in bounded chunks,
the tensors built with bounds-checked indexing, and the pickle read again to put them in
place. Every refusal is a `CheckpointError` naming the file and the tensor (its key in the
state dict, or its storage where no key is known) and what is wrong.

Some published weights are `torch.save` of a whole module object rather than a state dict
(OpenAI's DALL-E `encoder.pkl`): the pickle names the module classes (`torch.nn.*`,
`dall_e.*`) and rebuilds each one from its attribute dict. `load` refuses such files.
`load_module_state_dict` is the explicit opt-in for them: it turns those classes (and a few
inert values: `torch.device`, dtypes, `set`) into stand-ins that record what the pickle
passes them and nothing else, never importing or calling anything from the file, then walks
the recorded `_modules` / `_parameters` / `_buffers` into the flat state dict
`module.state_dict()` would give. Every other global is still refused, and every tensor
goes through the same checks as above.
"""

import collections
import math
import os
import pickle
import reprlib
import zipfile
from typing import Any

import numpy as np

from maeday_jax.weight_files.errors import CheckpointError

# Limits. The largest tensor of the official MAE checkpoints is ViT-Huge's
# `blocks.*.mlp.fc1.weight`: 5120 x 1280 = 6.6M elements (26 MB as float32). The largest
# file, mae_visualize_vit_huge.pth, holds about 660M parameters (2.6 GB as float32). Both
# limits leave room for much larger models while refusing terabyte-sized declarations
# before anything is allocated. `load` takes other values as arguments.

MAX_TENSOR_ELEMENTS = 1 << 28
"""Elements one tensor may have: 268M, about 40 times the largest official MAE tensor."""

MAX_TOTAL_BYTES = 8 << 30
"""Memory the storages read and the copies made may take together: 8 GiB, about three
times the largest official MAE checkpoint."""

MAX_PICKLE_BYTES = 64 << 20
"""Uncompressed size `data.pkl` may have: 64 MiB (the official MAE pickles are ~100 kB)."""

MAX_NDIM = 32
"""Dimensions one tensor may have (MAE tensors have at most 4; NumPy allows 64)."""

_READ_CHUNK_BYTES = 16 << 20  # Storages are inflated this many bytes at a time.
_INDEX_CHUNK = 1 << 20  # Strided tensors are gathered this many elements at a time.

# Storage class name -> NumPy dtype (the legacy typed storages `torch.save` still writes).
_STORAGE_DTYPES = {
  "DoubleStorage": np.float64,
  "FloatStorage": np.float32,
  "HalfStorage": np.float16,
  "BFloat16Storage": "bfloat16",
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 80


def _short(obj: Any) -> str:
  """A bounded repr of a value taken from the pickle, for error messages."""
  return _repr.repr(obj)


def _dtype(storage_name: str) -> np.dtype:
  dtype = _STORAGE_DTYPES[storage_name]
  if dtype == "bfloat16":
    import ml_dtypes  # A JAX dependency; only needed for bfloat16 archives.

    dtype = ml_dtypes.bfloat16
  return np.dtype(dtype)


def _unsupported(storage_name: str) -> str:
  supported = ", ".join(_STORAGE_DTYPES)
  return f"tensors of type torch.{storage_name} are not supported (only {supported})."


def _is_count(value: Any) -> bool:
  """Whether `value` is a plain non-negative int (not a bool, float or other type)."""
  return type(value) is int and value >= 0


class _Refused(Exception):
  """Why the archive is refused; `load` raises it as a `CheckpointError` naming the file."""


class _Opaque:
  """Base of the stand-ins the unpickler hands to the pickle.

  They cannot be hashed (so they cannot become dict keys or set members) and refuse the
  pickle's BUILD opcode (`__setstate__`), so the pickle can neither alter them nor hide
  them where the tensor search does not look.
  """

  __slots__ = ()

  def __hash__(self):
    raise _Refused(f"the pickle uses {self!r} as a dictionary key or set member.")

  def __setstate__(self, state):
    raise _Refused(f"the pickle sets attributes of {self!r}; this is not a tensor archive.")


class _StorageType(_Opaque):
  """Stand-in for a `torch.<X>Storage` class: only names the element type.

  Types outside `_STORAGE_DTYPES` are accepted here and refused by the tensors that use
  them, whose keys are known then.
  """

  __slots__ = ("name", "_invalid")

  def __init__(self, name: str, invalid: list):
    self.name = name
    self._invalid = invalid

  def __repr__(self):
    return f"torch.{self.name}"

  def __call__(self, *args):
    # Real archives refer to storages through persistent ids only.
    reason = (
      f"the pickle calls torch.{self.name}(...) directly; tensor archives refer to "
      "storages only through persistent ids, so the file is crafted or corrupt."
    )
    self._invalid.append(reason)
    return _Invalid(reason)


class _StorageRef(_Opaque):
  """A storage the pickle declared: its key in `data/`, element type and element count."""

  __slots__ = ("key", "type_name", "numel")

  def __init__(self, key: str, type_name: str, numel: int):
    self.key, self.type_name, self.numel = key, type_name, numel

  def __repr__(self):
    return f"storage {_short(self.key)}"


class _TensorRef(_Opaque):
  """A `_rebuild_tensor_v2` call of the first pass: its arguments, checked later."""

  __slots__ = ("index", "args")

  def __init__(self, index: int, args: tuple):
    self.index, self.args = index, args

  def __repr__(self):
    return "a tensor"


class _Invalid(_Opaque):
  """The result of a call no tensor archive makes; refused once its place is known."""

  __slots__ = ("reason",)

  def __init__(self, reason: str):
    self.reason = reason

  def __repr__(self):
    return "an invalid object"


class _Rebuild(_Opaque):
  """Stand-in for `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter`."""

  __slots__ = ("name", "_unpickler")

  def __init__(self, name: str, unpickler: "_RestrictedUnpickler"):
    self.name, self._unpickler = name, unpickler

  def __repr__(self):
    return f"torch._utils.{self.name}"

  def __call__(self, *args):
    return self._unpickler.rebuild(self.name, args)


class _ObjectStandIn(_Opaque):
  """Base of the inert stand-ins for the classes of a whole-module pickle.

  The unpickler makes one subclass per allowed global (`_stand_in_type`), named after it.
  Creating one (the pickle's NEWOBJ or REDUCE) records the arguments; BUILD (what
  `__setstate__` would receive) records the state. Nothing else happens: no code from
  PyTorch, `dall_e` or the file is imported or run. Unhashable, like every stand-in.
  """

  __slots__ = ("args", "state")
  global_name = "?"  # Set on each subclass: 'torch.nn.modules.container.Sequential'.

  def __new__(cls, *args, **kwargs):
    obj = super().__new__(cls)
    obj.args, obj.state = args, None
    return obj

  def __init__(self, *args, **kwargs):
    pass  # `__new__` recorded the arguments; nothing to initialise.

  def __setstate__(self, state):
    if self.state is not None:
      raise _Refused(f"the pickle sets the state of {self!r} twice; the file is crafted.")
    self.state = state

  def __repr__(self):
    return f"a {self.global_name} object"


def _stand_in_type(module: str, name: str) -> type:
  """A fresh `_ObjectStandIn` subclass standing for the global `module.name`."""
  return type(
    "StandIn",
    (_ObjectStandIn,),
    {"__slots__": (), "global_name": f"{module}.{name}", "__module__": __name__},
  )


def _make_set(items=()) -> frozenset:
  """Stand-in for `builtins.set` (how protocol 2 pickles a module's
  `_non_persistent_buffers_set`): only names, so nothing with a custom `__hash__` runs."""
  if not (isinstance(items, list | tuple) and all(isinstance(i, str) for i in items)):
    raise _Refused(f"the pickle builds a set of {_short(items)}; only sets of names are read.")
  return frozenset(items)


# Globals the opt-in module mode turns into stand-ins: module classes by package prefix,
# plus the plain values a module's attributes hold. Anything else is refused as usual.
_MODULE_PREFIXES = ("torch.nn.", "dall_e.")
_MODULE_VALUES = {("torch", "device"), ("torch", "Size"), ("torch", "dtype")} | {
  ("torch", dtype)
  for dtype in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16")
  + ("int8", "uint8", "bool")
}


class _RestrictedUnpickler(pickle.Unpickler):
  """An unpickler that knows only tensors, storages and ordered dicts.

  Without `arrays` (the first pass) storages and tensors come back as placeholders and no
  tensor data is read. With `arrays` (the second pass) the n-th tensor the pickle rebuilds
  is `arrays[n]` and a storage is `storages[key]` where it was read.
  """

  def __init__(
    self,
    file,
    arrays: dict | None = None,
    storages: dict | None = None,
    *,
    modules: bool = False,
  ):
    super().__init__(file)
    self._arrays = arrays
    self._storage_arrays = storages or {}
    self._modules = modules  # The opt-in whole-module mode: module classes become stand-ins.
    self._stand_ins: dict[tuple[str, str], type] = {}
    self.storages: dict[str, _StorageRef] = {}
    self.invalid: list[str] = []
    self.tensor_count = 0

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
      return _Rebuild(name, self)
    if module == "torch" and name.endswith("Storage"):
      if name not in _STORAGE_DTYPES:
        self.invalid.append(_unsupported(name))  # Refused even if no tensor uses it.
      return _StorageType(name, self.invalid)
    is_module_class = module.startswith(_MODULE_PREFIXES) or module == "torch.nn"
    if self._modules:
      if is_module_class or (module, name) in _MODULE_VALUES:
        key = (module, name)
        if key not in self._stand_ins:
          self._stand_ins[key] = _stand_in_type(module, name)
        return self._stand_ins[key]
      # Protocol 2 has no set opcode; the pickle spells `builtins.set` in Python 2 terms.
      if module in ("builtins", "__builtin__") and name == "set":
        return _make_set
    if self._modules:
      accepted = (
        "Only tensors and PyTorch module classes (torch.nn.*, dall_e.*, read as inert "
        "stand-ins) are accepted"
      )
    else:
      accepted = "Only plain tensor state dicts are accepted"
    if is_module_class:
      hint = (
        " This file holds a whole PyTorch module; `torch_zip.load_module_state_dict` reads "
        "its weights without running code from it."
      )
    else:
      hint = (
        " If you trust the file, re-save just its weights with PyTorch: "
        "torch.save({'model': state_dict}, 'weights.pth')."
      )
    raise _Refused(
      f"refusing to load the global '{module}.{name}' from the checkpoint's pickle. "
      f"{accepted}, because loading other objects can run arbitrary code.{hint}"
    )

  def rebuild(self, name: str, args: tuple) -> Any:
    if name == "_rebuild_parameter":
      if not 1 <= len(args) <= 3:
        return self._invalid(
          f"torch._utils._rebuild_parameter got {len(args)} arguments, expected 1 to 3 "
          "(data, requires_grad, backward_hooks)."
        )
      if self._arrays is None and not isinstance(args[0], _TensorRef):
        return self._invalid(f"a parameter is built from {_short(args[0])}, not a tensor.")
      return args[0]
    index = self.tensor_count
    self.tensor_count += 1
    if self._arrays is not None:
      return self._arrays.get(index)  # None for tensors the result does not contain.
    return _TensorRef(index, args)  # Checked by `_check_tensor` once its key is known.

  def _invalid(self, reason: str) -> _Invalid:
    self.invalid.append(reason)
    return _Invalid(reason)

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise _Refused(f"unsupported persistent id {_short(pid)} in the pickle.")
    _, storage_type, key, _location, numel = pid[:5]
    if type(key) is int:
      key = str(key)
    if not isinstance(key, str):
      raise _Refused(f"storage key {_short(key)} in the pickle is not a string.")
    where = f"storage {_short(key)}"
    if not isinstance(storage_type, _StorageType):
      raise _Refused(f"{where}: unsupported storage type {_short(storage_type)}.")
    if not _is_count(numel):
      raise _Refused(f"{where}: element count {_short(numel)} is not a non-negative integer.")
    known = self.storages.get(key)
    if known is None:
      known = self.storages[key] = _StorageRef(key, storage_type.name, numel)
    elif (known.type_name, known.numel) != (storage_type.name, numel):
      raise _Refused(
        f"{where} is declared twice, as {known.numel} x {known.type_name} and as "
        f"{numel} x {storage_type.name}."
      )
    return self._storage_arrays.get(key, known)


def _find_placeholders(root: Any) -> list[tuple[_Opaque, tuple]]:
  """Every placeholder reachable from `root` with its key path, in file order.

  Looks through dicts (and an `OrderedDict`'s attributes, such as `_metadata`), lists and
  tuples without recursion, so deep or cyclic containers are safe. Placeholders cannot be
  dict keys or set members (they are unhashable), so nothing is missed.
  """
  found, seen = [], set()
  stack = [(root, ())]
  while stack:
    obj, path = stack.pop()
    if id(obj) in seen:
      continue
    if isinstance(obj, _Opaque):
      seen.add(id(obj))
      found.append((obj, path))
    elif isinstance(obj, dict | list | tuple):
      seen.add(id(obj))
      children = list(obj.items()) if isinstance(obj, dict) else list(enumerate(obj))
      if isinstance(obj, dict):
        children += list(getattr(obj, "__dict__", {}).items())
      stack.extend((value, path + (key,)) for key, value in reversed(children))
  return found


def _label(path: tuple) -> str:
  """`tensor 'blocks.0.attn.qkv.weight'` for a key path ({'model': ...} left out)."""
  if not path:
    return "the saved tensor"
  if len(path) > 1 and isinstance(path[0], str) and path[0] in ("model", "state_dict"):
    path = path[1:]
  return "tensor '" + ".".join(k if isinstance(k, str) else _short(k) for k in path) + "'"


_MAX_MODULE_DEPTH = 256  # Nesting a module tree may have; real ones have a dozen levels.
# Modules one walk may visit. A submodule shared by two parents is visited under both
# names (as `state_dict()` does), so a crafted pickle could make a small tree of shared
# modules exponentially large; real networks have a few thousand modules at most.
_MAX_MODULE_VISITS = 1 << 17


def _module_state(module: _ObjectStandIn, where: str) -> dict:
  """The attribute dict a module's BUILD recorded ((dict, slots) tuples allowed)."""
  state = module.state
  if isinstance(state, tuple) and len(state) == 2:
    state = state[0]
  if not isinstance(state, dict):
    raise _Refused(f"{where} ({module!r}) has no attribute dict; it is not a PyTorch module.")
  return state


def _module_state_dict(root: Any) -> Any:
  """The flat state dict of a whole-module pickle's root, as `state_dict()` orders it.

  Keys join the `_modules` names with dots ('blocks.group_1.block_1.res_path.conv_1.w');
  a module's parameters come first, then its persistent buffers, then its children. A
  root that is not a module (a file holding a state dict) is returned unchanged, to be
  checked like any state dict. Tensors stay whatever the unpickler made of them
  (placeholders in the first pass, arrays in the second).
  """
  if not isinstance(root, _ObjectStandIn):
    return root
  result: dict[str, Any] = {}
  stack = [("", root, ())]  # (key prefix, module, ids of its ancestors)
  visits = 0
  while stack:
    prefix, module, ancestors = stack.pop()
    visits += 1
    if visits > _MAX_MODULE_VISITS:
      raise _Refused(
        f"the module tree has more than {_MAX_MODULE_VISITS} modules (counting shared ones "
        "once per name); the file is crafted."
      )
    where = f"module '{prefix[:-1]}'" if prefix else "the saved module"
    if not isinstance(module, _ObjectStandIn):
      raise _Refused(f"{where} is {_short(module)}, not a PyTorch module.")
    if id(module) in ancestors or len(ancestors) >= _MAX_MODULE_DEPTH:
      raise _Refused(f"{where} contains itself or nests too deep; the file is crafted.")
    state = _module_state(module, where)
    skipped = state.get("_non_persistent_buffers_set", frozenset())
    if not isinstance(skipped, frozenset | set):
      raise _Refused(f"{where}: _non_persistent_buffers_set is {_short(skipped)}, not a set.")
    for attribute in ("_parameters", "_buffers", "_modules"):
      if not isinstance(state.get(attribute), dict):
        raise _Refused(f"{where} ({module!r}) has no {attribute} dict; it is not a PyTorch module.")
      for name in state[attribute]:
        if not isinstance(name, str):
          raise _Refused(f"{where}: {attribute} has the key {_short(name)}, not a name.")
    for attribute in ("_parameters", "_buffers"):
      for name, value in state[attribute].items():
        if value is None or (attribute == "_buffers" and name in skipped):
          continue  # state_dict() leaves out missing parameters and non-persistent buffers.
        if not isinstance(value, _TensorRef | _Invalid | np.ndarray):
          raise _Refused(f"{where}: {attribute[1:-1]} '{name}' is {_short(value)}, not a tensor.")
        result[prefix + name] = value
    children = [(n, m) for n, m in state["_modules"].items() if m is not None]
    for name, child in reversed(children):
      stack.append((f"{prefix}{name}.", child, ancestors + (id(module),)))
  return result


class _Plan:
  """A checked tensor: which storage elements it takes and how much memory it needs."""

  def __init__(self, label, storage, offset, size, stride):
    self.label, self.storage, self.offset = label, storage, offset
    self.size, self.stride = size, stride
    self.numel = math.prod(size)
    self.itemsize = _dtype(storage.type_name).itemsize
    self.contiguous = _is_contiguous(size, stride)

  @property
  def copy_bytes(self) -> int:
    """Bytes beyond the storage: strided tensors and scalars are copied, views are not."""
    if self.numel and (not self.contiguous or not self.size):
      return self.numel * self.itemsize
    return 0


def _is_contiguous(size: tuple, stride: tuple) -> bool:
  expected = 1
  for n, s in zip(reversed(size), reversed(stride), strict=True):
    if n != 1 and s != expected:
      return False
    expected *= n
  return True


def _check_tensor(ref: _TensorRef, label: str, max_elements: int) -> _Plan:
  """Checks a `_rebuild_tensor_v2` call's arguments against its storage, reading nothing."""
  args = ref.args
  if not 4 <= len(args) <= 7:
    raise _Refused(
      f"{label}: torch._utils._rebuild_tensor_v2 got {len(args)} arguments, expected 4 to "
      "7 (storage, storage_offset, size, stride, ...)."
    )
  storage, offset, size, stride = args[:4]
  if not isinstance(storage, _StorageRef):
    raise _Refused(f"{label}: built from {_short(storage)} instead of a storage.")
  label = f"{label} (storage {_short(storage.key)})"
  if storage.type_name not in _STORAGE_DTYPES:
    raise _Refused(f"{label}: {_unsupported(storage.type_name)}")
  if not _is_count(offset):
    raise _Refused(f"{label}: storage offset {_short(offset)} is not a non-negative integer.")
  for what, value in (("size", size), ("stride", stride)):
    if not (isinstance(value, tuple | list) and all(_is_count(n) for n in value)):
      raise _Refused(f"{label}: {what} {_short(value)} is not a tuple of non-negative integers.")
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride):
    raise _Refused(f"{label}: size {size} and stride {stride} differ in length.")
  if len(size) > MAX_NDIM:
    raise _Refused(f"{label}: {len(size)} dimensions, more than the {MAX_NDIM} supported.")
  numel = math.prod(size)
  if numel > max_elements or any(n > max_elements for n in size):
    raise _Refused(
      f"{label}: shape {_short(size)} has {numel} elements, more than the {max_elements} a "
      "checkpoint tensor may have (MAX_TENSOR_ELEMENTS); the file is corrupt or crafted."
    )
  if numel:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.numel:
      raise _Refused(
        f"{label}: the view (offset {offset}, size {size}, stride {_short(stride)}) reaches "
        f"element {last}, but the storage holds {storage.numel} elements; the file is "
        "corrupt or crafted."
      )
  return _Plan(label, storage, offset, size, stride)


def _read_storage(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dtype: np.dtype, label):
  """Reads a storage member whose size was checked, a bounded chunk at a time."""
  array = np.empty(info.file_size // dtype.itemsize, dtype.newbyteorder("<"))
  raw = array.view(np.uint8)
  with archive.open(info) as f:
    pos = 0
    while pos < raw.size:
      chunk = f.read(min(_READ_CHUNK_BYTES, raw.size - pos))
      if not chunk:
        raise _Refused(
          f"{label}: storage '{info.filename}' ends after {pos} of {raw.size} bytes; the "
          "file is truncated or corrupt."
        )
      raw[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
      pos += len(chunk)
    if f.read(1):  # Also makes zipfile verify the CRC.
      raise _Refused(f"{label}: storage '{info.filename}' is longer than declared.")
  array = array.astype(dtype, copy=False)  # To native byte order.
  if dtype == np.bool_:
    array = array.view(np.uint8) != 0  # Any byte other than 0 or 1 is not a NumPy bool.
  array.flags.writeable = False
  return array


def _build(plan: _Plan, storage: np.ndarray) -> np.ndarray:
  """The tensor `plan` describes, taken from `storage` without leaving its buffer.

  Contiguous tensors are views of a slice; strided ones are gathered with `take`, which
  checks every index, so even a wrong plan cannot read outside the storage.
  """
  if not plan.numel:
    return np.empty(plan.size, storage.dtype)
  if plan.contiguous:
    view = storage[plan.offset : plan.offset + plan.numel].reshape(plan.size)
    return view if plan.size else view.copy()
  out = np.empty(plan.numel, storage.dtype)
  for start in range(0, plan.numel, _INDEX_CHUNK):
    flat = np.arange(start, min(start + _INDEX_CHUNK, plan.numel), dtype=np.int64)
    index = np.full(flat.size, plan.offset, np.int64)
    for n, s in zip(reversed(plan.size), reversed(plan.stride), strict=True):
      if n > 1:
        index += (flat % n) * s
        flat //= n
    out[start : start + index.size] = storage.take(index)
  return out.reshape(plan.size)


def _load_archive(
  archive: zipfile.ZipFile, max_elements: int, max_bytes: int, modules: bool = False
) -> Any:
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("data.pkl")]
  if not pickles:
    raise _Refused("zip archive without data.pkl; not a PyTorch checkpoint.")
  pickle_info = archive.getinfo(pickles[0])
  prefix = pickles[0][: -len("data.pkl")].rstrip("/")
  byteorder = f"{prefix}/byteorder"
  if byteorder in names:
    if archive.getinfo(byteorder).file_size > 16:
      raise _Refused(f"'{byteorder}' is not a byte-order record; the file is corrupt.")
    if archive.read(byteorder).strip() != b"little":
      raise _Refused("big-endian archives are not supported.")
  if pickle_info.file_size > MAX_PICKLE_BYTES:
    raise _Refused(
      f"'{pickle_info.filename}' is {pickle_info.file_size} bytes, more than the "
      f"{MAX_PICKLE_BYTES} a tensor archive's pickle needs (MAX_PICKLE_BYTES)."
    )

  # First pass: placeholders only; check everything before reading any tensor data.
  with archive.open(pickle_info) as f:
    first = _RestrictedUnpickler(f, modules=modules)
    root = first.load()
  if modules:
    root = _module_state_dict(root)
  plans: dict[int, _Plan] = {}
  used: dict[str, tuple[_StorageRef, str]] = {}  # Storage key -> (storage, first user).
  for obj, path in _find_placeholders(root):
    label = _label(path)
    if isinstance(obj, _TensorRef):
      plans[obj.index] = plan = _check_tensor(obj, label, max_elements)
      used.setdefault(plan.storage.key, (plan.storage, label))
    elif isinstance(obj, _StorageRef):  # A bare storage: returned as a 1-D array.
      if obj.type_name not in _STORAGE_DTYPES:
        raise _Refused(f"{label} ({obj!r}): {_unsupported(obj.type_name)}")
      if obj.numel > max_elements:
        raise _Refused(
          f"{label} ({obj!r}): {obj.numel} elements, more than the {max_elements} a "
          "checkpoint tensor may have (MAX_TENSOR_ELEMENTS)."
        )
      used.setdefault(obj.key, (obj, label))
    elif isinstance(obj, _Invalid):
      raise _Refused(f"{label}: {obj.reason}")
    else:
      raise _Refused(f"{label}: the pickle stores {obj!r} itself, not a tensor.")
  if first.invalid:
    raise _Refused(first.invalid[0])

  members, needs = {}, []
  for key, (storage, label) in used.items():
    member = f"{prefix}/data/{key}"
    try:
      info = archive.getinfo(member)
    except KeyError:
      raise _Refused(f"{label}: its storage '{member}' is missing.") from None
    expected = storage.numel * _dtype(storage.type_name).itemsize
    if info.file_size != expected:
      raise _Refused(
        f"{label}: its storage '{member}' is {info.file_size} bytes uncompressed, but the "
        f"pickle declares {storage.numel} elements of torch.{storage.type_name} "
        f"({expected} bytes); the file is truncated, corrupt or crafted."
      )
    members[key] = info
    needs.append((expected, f"the storage '{member}' of {label}"))
  needs += [(plan.copy_bytes, f"the copy of {plan.label}") for plan in plans.values()]
  total = sum(n for n, _ in needs)
  if total > max_bytes:
    largest, what = max(needs)
    raise _Refused(
      f"its tensors need {total} bytes of memory, more than the {max_bytes} a checkpoint "
      f"may take (MAX_TOTAL_BYTES); the largest part is {what} ({largest} bytes)."
    )

  # Read the checked storages, build the tensors, and put them in place (second pass).
  storages = {
    key: _read_storage(archive, info, _dtype(used[key][0].type_name), used[key][1])
    for key, info in members.items()
  }
  arrays = {index: _build(plan, storages[plan.storage.key]) for index, plan in plans.items()}
  with archive.open(pickle_info) as f:
    second = _RestrictedUnpickler(f, arrays=arrays, storages=storages, modules=modules)
    result = second.load()
  if modules:
    result = _module_state_dict(result)
    if isinstance(root, dict) and list(result) != list(root):
      raise _Refused("the pickle changed while it was read.")
  if second.tensor_count != first.tensor_count:
    raise _Refused("the pickle changed while it was read.")
  return result


def is_torch_zip(path: str | os.PathLike) -> bool:
  """Whether `path` looks like a `torch.save` zip archive (has a `*/data.pkl`)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())


# `torch.save` before PyTorch 1.6 (or with `_use_new_zipfile_serialization=False`) writes
# a run of pickles instead of a zip, starting with this magic number pickled (protocol 2).
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # Without STOP.


def _is_legacy(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def _not_a_zip(path: str) -> CheckpointError:
  if os.path.isfile(path) and _is_legacy(path):
    return CheckpointError(
      f"{path}: PyTorch's legacy (pre-1.6, non-zip) torch.save format, which is not read "
      "here. Where you trust the file, re-save it with a current PyTorch as a state dict: "
      "obj = torch.load(path, weights_only=False); torch.save(obj.state_dict() if "
      "isinstance(obj, torch.nn.Module) else obj, 'weights.pth')."
    )
  return CheckpointError(
    f"{path}: not a PyTorch zip archive (files saved by torch >= 1.6 are zip archives; "
    "re-save older ones with a current PyTorch)."
  )


def _load(path, max_tensor_elements, max_total_bytes, modules: bool) -> Any:
  path = os.fspath(path)
  if max_tensor_elements is None:
    max_tensor_elements = MAX_TENSOR_ELEMENTS
  if max_total_bytes is None:
    max_total_bytes = MAX_TOTAL_BYTES
  if not zipfile.is_zipfile(path):
    raise _not_a_zip(path)
  try:
    with zipfile.ZipFile(path) as archive:
      return _load_archive(archive, max_tensor_elements, max_total_bytes, modules)
  except CheckpointError:
    raise
  except _Refused as e:
    raise CheckpointError(f"{path}: {e}") from None
  except Exception as e:  # A malformed pickle or zip can raise nearly anything.
    raise CheckpointError(f"{path}: corrupt PyTorch archive ({type(e).__name__}: {e}).") from e


def load(
  path: str | os.PathLike,
  *,
  max_tensor_elements: int | None = None,
  max_total_bytes: int | None = None,
) -> Any:
  """Loads the object saved in a PyTorch zip archive, with tensors as NumPy arrays.

  Args:
    path: the `.pth` file.
    max_tensor_elements: elements one tensor may have (default `MAX_TENSOR_ELEMENTS`).
    max_total_bytes: memory the tensor data may take in all (default `MAX_TOTAL_BYTES`).

  Raises:
    CheckpointError: the file is not a PyTorch zip archive, is corrupt, its pickle
      references anything other than tensors and plain containers, or a tensor does not
      fit its storage or the limits. Nothing large is allocated before these checks.
  """
  return _load(path, max_tensor_elements, max_total_bytes, modules=False)


def load_module_state_dict(
  path: str | os.PathLike,
  *,
  max_tensor_elements: int | None = None,
  max_total_bytes: int | None = None,
) -> Any:
  """The state dict of a `torch.save(module)` file, read without PyTorch or running code.

  The opt-in reader for files that hold a whole module object (OpenAI's DALL-E
  `encoder.pkl`). Globals of `torch.nn.*` and `dall_e.*` classes, `torch.device`, torch
  dtypes and `set` become inert stand-ins that only record what the pickle passes them;
  no class is imported and nothing from the file runs. Every other global is refused
  before anything is called, as by `load`. The module tree is then walked through its
  `_modules`, `_parameters` and `_buffers`, and every tensor is checked as by `load`.

  Args:
    path: the file written by `torch.save(module)` (a zip archive). A file holding a
      state dict (or `{'model': state_dict}`) is returned as `load` would return it.
    max_tensor_elements, max_total_bytes: as for `load`.

  Returns:
    {key: np.ndarray} with the keys `module.state_dict()` has ('blocks.input.w'), in its
    order; non-persistent buffers and `None` parameters are left out, like there.

  Raises:
    CheckpointError: as for `load`; also when the file is in PyTorch's legacy (non-zip)
      format, or the saved object is not a module tree (naming what it found instead).
  """
  return _load(path, max_tensor_elements, max_total_bytes, modules=True)

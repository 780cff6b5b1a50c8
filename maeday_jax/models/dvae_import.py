"""DALL-E dVAE encoder weights -> `maeday_jax.models.dvae.DalleEncoder` and its params.

    module, params = load("dalle_encoder")           # OpenAI's encoder.pkl, downloaded once
    module, params = load("/data/encoder.pkl")       # a local copy (or a state dict file)
    module, params = from_state_dict(state, expected=None)   # any size, inferred

OpenAI publishes the encoder as `torch.save` of the whole `dall_e.Encoder` module
(`https://cdn.openai.com/dall-e/encoder.pkl`), not as a state dict. It is read by
`torch_zip.load_module_state_dict`, the opt-in mode of the project's restricted reader in
which the module classes become inert stand-ins: nothing from the file is imported or run,
and every other global (`os.system`, `eval`, ...) is refused before anything is called.
A plain state dict of the same keys loads too: `.pth` (`torch.save(encoder.state_dict())`)
or `.safetensors`. Keys may carry an `encoder.` prefix (the encoder saved inside a larger
model) or DistributedDataParallel's `module.`.

The architecture is read off the keys and shapes (`infer_architecture`) and compared with
`expected` (the public one by default), then every tensor is checked against that
architecture's parameters: a different vocabulary, a missing or extra key, or a wrong shape
is a `CheckpointError` that names the file, what was expected and what was found. Conv
weights OIHW become HWIO; the key path is otherwise the Flax path, split on dots.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maeday_jax.models import dvae, weights
from maeday_jax.weight_files import CheckpointError, state_dicts, torch_zip

__all__ = [
  "expected_shapes",
  "from_state_dict",
  "infer_architecture",
  "load",
  "read_state_dict",
  "resolve",
  "to_params",
]

_GROUP_KEY = re.compile(r"blocks\.group_(\d+)\.")
_BLOCK_KEY = re.compile(r"blocks\.group_1\.block_(\d+)\.")
_LISTED = 12  # Keys named in one error message; the rest are counted.
_PREFIXES = ("module.", "encoder.")  # Wrappers a saved encoder's keys may carry.


def _listing(keys) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:_LISTED])
  return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def _unwrap(obj: Any, source: str) -> dict[str, np.ndarray]:
  """The encoder's state dict inside what a file held: {'model': sd}, prefixed keys."""
  return state_dicts.unwrap_state_dict(
    obj, source, _PREFIXES, "a DALL-E encoder (the module or its state dict of tensors)"
  )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The encoder's state dict ('blocks.input.w', ...) from any file it comes in.

  A `torch.save(encoder)` file (OpenAI's `encoder.pkl`) is read in the module mode of
  `torch_zip` (module classes as inert stand-ins, no code from the file runs); a
  `torch.save(state_dict)` file or a `.safetensors` file as a state dict.

  Raises:
    CheckpointError: the file is missing, of another format (PyTorch's legacy non-zip
      format included: the message says how to re-save it), corrupt or crafted.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise CheckpointError(f"{path}: no such DALL-E encoder file.")
  if state_dicts.is_safetensors(path):
    return _unwrap(state_dicts.read_state_dict(path), str(path))
  # Not a zip: `load_module_state_dict` explains (legacy format, or something else).
  return _unwrap(torch_zip.load_module_state_dict(path), str(path))


def _shape(state: dict, key: str, source: str) -> tuple[int, ...]:
  if key not in state:
    raise CheckpointError(
      f"{source}: not a DALL-E dVAE encoder: the key {key!r} is missing (found "
      f"{_listing(state) or 'no keys'})."
    )
  return tuple(state[key].shape)


def _count(pattern: re.Pattern, state: dict, what: str, source: str) -> int:
  """How many consecutive indices 1..n `pattern` finds in the keys (gaps refused)."""
  found = {int(m.group(1)) for m in map(pattern.match, state) if m}
  if not found or found != set(range(1, max(found) + 1)):
    raise CheckpointError(
      f"{source}: not a DALL-E dVAE encoder: {what} numbered {sorted(found) or 'none'}, "
      "expected 1, 2, ... without gaps."
    )
  return len(found)


def infer_architecture(state: dict[str, np.ndarray], source: str = "state dict") -> dict:
  """The `DalleEncoder` fields (`dvae.ARCH_FIELDS`) of an encoder state dict.

  Read from the keys and shapes alone: `n_hid` and `input_channels` from
  `blocks.input.w` (n_hid, channels, 7, 7), the groups and group 1's blocks from the key
  names, `vocab_size` from `blocks.output.conv.w`. The other tensors are checked by
  `to_params`.

  Raises:
    CheckpointError: a key the inference needs is missing or has an unexpected shape.
  """
  stem = _shape(state, "blocks.input.w", source)
  if len(stem) != 4 or stem[2:] != (7, 7):
    raise CheckpointError(
      f"{source}: blocks.input.w has shape {stem}, not (n_hid, channels, 7, 7): not a "
      "DALL-E dVAE encoder."
    )
  head = _shape(state, "blocks.output.conv.w", source)
  if len(head) != 4:
    raise CheckpointError(
      f"{source}: blocks.output.conv.w has shape {head}, not a conv weight (O, I, H, W)."
    )
  return dict(
    group_count=_count(_GROUP_KEY, state, "groups (blocks.group_<k>)", source),
    n_hid=stem[0],
    n_blk_per_group=_count(_BLOCK_KEY, state, "blocks of group 1", source),
    input_channels=stem[1],
    vocab_size=head[0],
  )


def expected_shapes(module: dvae.DalleEncoder) -> dict[str, tuple[int, ...]]:
  """Every state-dict key `module` has, with its PyTorch shape (conv weights OIHW)."""
  x = jax.ShapeDtypeStruct((1, 8, 8, module.input_channels), jnp.float32)
  tree = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  shapes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = leaf.shape
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW.
    shapes[".".join(p.key for p in path)] = tuple(shape)
  return shapes


def to_params(
  state: dict[str, np.ndarray], module: dvae.DalleEncoder, source: str = "state dict"
) -> dict:
  """Maps an encoder state dict onto `module`'s parameter tree (float32 NumPy arrays).

  Every parameter must be present with its shape, every key must be used.

  Raises:
    CheckpointError: naming `source`, the architecture, and the missing, unexpected,
      misshapen or non-floating keys.
  """
  expected = expected_shapes(module)
  missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
  problems = []
  if missing:
    problems.append(f"missing keys: {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listing(unexpected)}")
  wrong_shape, wrong_type = [], []
  for key in sorted(expected.keys() & state.keys()):
    value = state[key]
    if tuple(value.shape) != expected[key]:
      wrong_shape.append(f"{key} {tuple(value.shape)} (expected {expected[key]})")
    elif not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
      wrong_type.append(f"{key} ({value.dtype})")
  if wrong_shape:
    problems.append(f"wrong shapes: {_listing(wrong_shape)}")
  if wrong_type:
    problems.append(f"not floating-point: {_listing(wrong_type)}")
  if problems:
    arch = ", ".join(f"{k}={v}" for k, v in dvae.architecture(module).items())
    raise CheckpointError(
      f"{source}: does not fit a DALL-E dVAE encoder ({arch}): " + "; ".join(problems) + "."
    )
  params: dict = {}
  for key in expected:
    *modules, leaf = key.split(".")
    node = params
    for name in modules:
      node = node.setdefault(name, {})
    value = np.asarray(state[key], np.float32)
    if value.ndim == 4:
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # Conv OIHW -> HWIO.
    node[leaf] = value
  return params


def from_state_dict(
  state: dict[str, np.ndarray],
  *,
  source: str = "state dict",
  expected: dict | None = dvae.PUBLIC,
  dtype: Any = jnp.float32,
) -> tuple[dvae.DalleEncoder, dict]:
  """Infers the architecture of an encoder state dict and converts it: `(module, params)`.

  Args:
    state: {PyTorch key: array}, as `read_state_dict` returns.
    source: the file, for messages.
    expected: architecture fields the weights must have (`dvae.PUBLIC` by default: PMAD
      predicts the public 8192-code vocabulary); a subset is fine ({'vocab_size': 8192});
      None accepts any encoder.
    dtype: the module's compute dtype; the params are float32 NumPy arrays.

  Raises:
    CheckpointError: not a DALL-E encoder, or not the `expected` one (naming each field's
      expected and found value).
  """
  arch = infer_architecture(state, source)
  if expected:
    unknown = set(expected) - set(dvae.ARCH_FIELDS)
    if unknown:
      raise ValueError(f"expected: unknown fields {sorted(unknown)}; use {dvae.ARCH_FIELDS}.")
    differ = [f"{k} {v} expected, found {arch[k]}" for k, v in expected.items() if arch[k] != v]
    if differ:
      raise CheckpointError(
        f"{source}: not the expected DALL-E encoder: {'; '.join(differ)}. Pass "
        "expected=None to load an encoder of another size."
      )
  module = dvae.DalleEncoder(**arch, dtype=dtype)
  return module, to_params(state, module, source)


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
  """Maps a known dVAE name ('dalle_encoder') or a file to a local file.

  Raises:
    CheckpointError: neither a known name nor an existing file.
    DownloadError: the download failed or arrived corrupt (nothing is kept).
  """
  return weights.resolve(name_or_path, cache_dir, kind="dvae")


def load(
  path_or_name: str | os.PathLike = "dalle_encoder",
  *,
  cache_dir: str | os.PathLike | None = None,
  expected: dict | None = dvae.PUBLIC,
  dtype: Any = jnp.float32,
) -> tuple[dvae.DalleEncoder, dict]:
  """Loads a DALL-E dVAE encoder; returns `(module, params)` for `dvae.tokens`.

  Args:
    path_or_name: 'dalle_encoder' (OpenAI's published weights, downloaded once into
      `<cache>/dvae/`) or a local file: the module file (`encoder.pkl`), or a state dict
      (`.pth` / `.safetensors`).
    cache_dir: the cache root for known names; default `$MAEDAY_CACHE_DIR` or
      `~/.cache/maeday_jax`.
    expected: as for `from_state_dict` (the public architecture by default).
    dtype: the module's compute dtype.

  Raises:
    CheckpointError: the file is unreadable, crafted, or not the expected encoder; a
      downloaded file that fails to load is deleted.
    DownloadError: a known name could not be downloaded intact.
  """
  path = resolve(path_or_name, cache_dir)
  try:
    module, params = from_state_dict(
      read_state_dict(path), source=str(path), expected=expected, dtype=dtype
    )
  except CheckpointError as e:
    if not weights.is_known(path_or_name, "dvae"):
      raise
    raise weights.discard_download(path, e) from e
  return module, jax.tree.map(jnp.asarray, params)

"""torchvision / timm ResNet weights -> `maeday_jax.models.resnet.ResNet` and its variables.

    model, variables = load_backbone("wide_resnet50_2")   # a known name or a local path
    state = read_state_dict("resnet18-f37072fd.pth")      # NumPy arrays by torchvision key
    model, variables = from_state_dict(state, source="resnet18-f37072fd.pth")

Known names (`KNOWN_BACKBONES`, a view of the shared table `maeday_jax.models.weights`)
download torchvision's published weights once into `<cache>/backbones/`
(`$MAEDAY_CACHE_DIR`, default `~/.cache/maeday_jax`), checking the SHA-256 prefix in the
file name. A path may be any torchvision or timm ResNet state dict, as `.pth` (read
without running code from the file) or `.safetensors`. PyTorch is never needed.

The architecture (block type, blocks per layer, widths) is read off the keys and shapes,
then every tensor is checked against the variables that architecture has: conv weights
OIHW become HWIO kernels, BatchNorm `weight`/`bias` become `scale`/`bias` params and
`running_mean`/`running_var` become `mean`/`var` batch statistics. `num_batches_tracked`
and the classifier (`fc.*`) are not needed and are skipped; any other key that the
architecture has no place for, a missing key or a wrong shape is a `CheckpointError`
that names the file and lists the keys.

timm's ResNets (`resnet18.a1_in1k`, `wide_resnet50_2.tv_in1k`, ...) use the same key
names as torchvision and load the same way, from `.pth` or safetensors. Variants with
other stems or blocks (timm's `resnet50d`, SE or anti-aliased blocks) are refused.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from maeday_jax import download
from maeday_jax.models import resnet, weights
from maeday_jax.weight_files import CheckpointError, state_dicts

__all__ = [
  "KNOWN_BACKBONES",
  "from_state_dict",
  "infer_architecture",
  "load_backbone",
  "read_state_dict",
  "resolve",
  "to_variables",
]


def _entry(url: str) -> weights.Weights:
  return weights.Weights(url, "backbone", sha256_prefix=download.sha256_prefix_from_name(url))


KNOWN_BACKBONES = weights.known("backbone", lambda entry: entry.url, _entry)
"""Backbone names -> torchvision's ImageNet weights (IMAGENET1K_V1): a live view of the
backbone entries of `weights.KNOWN`. The file names carry the first hex digits of each
file's SHA-256, which the download checks."""

_BN_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")
_LISTED = 12  # Keys named in one error message; the rest are counted.


def _is_skipped(key: str) -> bool:
  return key.endswith(".num_batches_tracked") or key.startswith("fc.")


def _listing(keys) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:_LISTED])
  return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a ResNet `.pth` (PyTorch zip archive) or safetensors file as NumPy arrays.

  The `.pth` goes through the restricted reader of `maeday_jax.weight_files.torch_zip`,
  which accepts tensors and plain containers only and never runs code from the file.
  `{"state_dict": ...}` / `{"model": ...}` wrappers and `module.` prefixes are removed.

  Raises:
    CheckpointError: the file is missing, of another format, corrupt or crafted.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise CheckpointError(f"{path}: no such backbone checkpoint file.")
  if not state_dicts.is_state_dict_file(path):
    raise CheckpointError(
      f"{path}: not a backbone checkpoint this library can read. Expected a torchvision "
      "or timm ResNet state dict saved by torch.save (a PyTorch zip archive; re-save "
      "files written by torch < 1.6 with a current PyTorch) or a .safetensors file."
    )
  return state_dicts.read_state_dict(path)


def _shape(state: dict, key: str, source: str) -> tuple[int, ...]:
  if key not in state:
    raise CheckpointError(
      f"{source}: not a torchvision-layout ResNet: the key {key!r} is missing (found "
      f"{_listing(state) or 'no keys'})."
    )
  return tuple(state[key].shape)


def _first_gaps(found: set[int], count: int = 3) -> list[int]:
  """The first `count` block indices below the highest one that are not in `found`."""
  missing, i = [], 0
  while len(missing) < count and i < max(found):  # At most len(found) + count steps.
    if i not in found:
      missing.append(i)
    i += 1
  return missing


def infer_architecture(state: dict[str, np.ndarray], source: str = "state dict") -> dict:
  """The `ResNet` fields {block, layers, width, width_per_group} of a state dict.

  Read from the keys and shapes alone: the block type from `layer1.0.conv3` (bottlenecks
  only), the blocks per layer from the highest `layer{k}.{i}` index, the width from
  `conv1.weight` and the bottleneck's inner width from `layer1.0.conv1.weight`. The rest
  of the tensors are checked by `to_variables`.

  Raises:
    CheckpointError: a key the inference needs is missing or has an unexpected shape.
  """
  stem = _shape(state, "conv1.weight", source)
  if len(stem) != 4 or stem[1:] != (3, 7, 7):
    raise CheckpointError(
      f"{source}: conv1.weight has shape {stem}, not (width, 3, 7, 7): not a "
      "torchvision-layout ResNet stem."
    )
  blocks: dict[int, set[int]] = {k: set() for k in range(1, 5)}
  for key in state:
    match = _BLOCK_KEY.match(key)
    if match:
      blocks[int(match.group(1))].add(int(match.group(2)))
  empty = [f"layer{k}" for k, found in blocks.items() if not found]
  if empty:
    raise CheckpointError(
      f"{source}: no blocks found for {', '.join(empty)} (no 'layer<k>.<i>.*' keys); not "
      "a torchvision-layout ResNet with four layers."
    )
  gaps = {k: _first_gaps(found) for k, found in blocks.items() if max(found) + 1 != len(found)}
  if gaps:
    named = [f"layer{k}.{i}" for k, missing in gaps.items() for i in missing]
    raise CheckpointError(
      f"{source}: blocks are missing between the numbered ones (first missing: "
      f"{', '.join(named)}); not a torchvision-layout ResNet."
    )
  layers = tuple(len(found) for found in blocks.values())
  block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
  arch: dict[str, Any] = dict(block=block, layers=layers, width=stem[0])
  if block == "bottleneck":
    inner = _shape(state, "layer1.0.conv1.weight", source)
    if len(inner) != 4:
      raise CheckpointError(
        f"{source}: layer1.0.conv1.weight has shape {inner}, not a conv weight (O, I, H, W)."
      )
    if inner[0] != stem[0]:  # Equal for ResNet-50/101/152: the default, left out.
      arch["width_per_group"] = inner[0]
  return arch


def _torch_name(module: str) -> str:
  return re.sub(r"_(\d+)$", r".\1", module)  # layer2_0 -> layer2.0, downsample_1 -> ...


def _torch_key(collection: str, path: tuple[str, ...]) -> str:
  *modules, leaf = path
  prefix = ".".join(_torch_name(m) for m in modules)
  if collection == "params" and leaf == "kernel":
    return f"{prefix}.weight"
  return f"{prefix}.{_BN_NAMES[leaf]}"


def _is_float(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def to_variables(
  state: dict[str, np.ndarray], model: resnet.ResNet, source: str = "state dict"
) -> dict:
  """Maps a torchvision-key state dict onto `model`'s variables {"params", "batch_stats"}.

  Returns float32 NumPy arrays. Every variable must be present with its shape; keys
  other than `num_batches_tracked` and `fc.*` must all be used.

  Raises:
    CheckpointError: naming `source` and listing the missing, unexpected, misshapen or
      non-floating keys.
  """
  expected = {}
  for collection, tree in resnet.variable_shapes(model).items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = tuple(p.key for p in path)
      expected[_torch_key(collection, names)] = (collection, names, leaf.shape)
  present = {k for k in state if not _is_skipped(k)}
  missing, unexpected = expected.keys() - present, present - expected.keys()
  problems = []
  if missing:
    problems.append(f"missing keys: {_listing(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listing(unexpected)}")
  wrong_shape, wrong_type = [], []
  for key in sorted(expected.keys() & present):
    _, _, shape = expected[key]
    value = state[key]
    torch_shape = shape if len(shape) != 4 else (shape[3], shape[2], shape[0], shape[1])
    if tuple(value.shape) != tuple(torch_shape):
      wrong_shape.append(f"{key} {tuple(value.shape)} (expected {tuple(torch_shape)})")
    elif not _is_float(value.dtype):
      wrong_type.append(f"{key} ({value.dtype})")
  if wrong_shape:
    problems.append(f"wrong shapes: {_listing(wrong_shape)}")
  if wrong_type:
    problems.append(f"not floating-point: {_listing(wrong_type)}")
  if problems:
    arch = ", ".join(
      f"{f}={getattr(model, f)!r}" for f in ("block", "layers", "width", "width_per_group")
    )
    raise CheckpointError(
      f"{source}: does not fit a torchvision-layout ResNet ({arch}): " + "; ".join(problems) + "."
    )
  variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
  for key, (collection, names, shape) in expected.items():
    node = variables[collection]
    for name in names[:-1]:
      node = node.setdefault(name, {})
    value = np.asarray(state[key], np.float32)
    if len(shape) == 4:
      value = np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # Conv OIHW -> HWIO.
    node[names[-1]] = value
  return variables


def from_state_dict(
  state: dict[str, np.ndarray], *, source: str = "state dict", dtype: Any = jnp.float32
) -> tuple[resnet.ResNet, dict]:
  """Infers the architecture of a state dict and converts it: `(model, variables)`.

  The variables are float32 NumPy arrays; `dtype` is the model's compute dtype.

  Raises:
    CheckpointError: the state dict is not a torchvision-layout ResNet.
  """
  arch = infer_architecture(state, source)
  try:
    model = resnet.ResNet(**arch, dtype=dtype)
  except ValueError as e:
    raise CheckpointError(f"{source}: unsupported ResNet architecture {arch} ({e}).") from e
  return model, to_variables(state, model, source)


def resolve(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
  """Maps a known backbone name or a file to a local file (`weights.resolve`).

  Raises:
    CheckpointError: neither a known name nor an existing file.
    DownloadError: the download failed or arrived corrupt (nothing is kept).
  """
  return weights.resolve(name_or_path, cache_dir, kind="backbone")


def load_backbone(
  path_or_name: str | os.PathLike,
  *,
  cache_dir: str | os.PathLike | None = None,
  dtype: Any = jnp.float32,
) -> tuple[resnet.ResNet, dict]:
  """Loads a ResNet backbone; returns `(model, variables)` for `model.apply`.

  Args:
    path_or_name: a known name (`resnet18`, `resnet50`, `wide_resnet50_2`) or a
      torchvision / timm ResNet state dict (`.pth` or `.safetensors`).
    cache_dir: where known names are downloaded (into its `backbones/` folder); default
      `$MAEDAY_CACHE_DIR` or `~/.cache/maeday_jax`.
    dtype: compute dtype of the model; the variables are float32 regardless.

  Returns:
    The `ResNet` (architecture inferred from the file) and its variables
    {"params", "batch_stats"} as JAX arrays.

  Raises:
    CheckpointError: the file is unreadable, crafted, or not a torchvision-layout ResNet;
      the message names the file and the offending keys. A downloaded file that fails
      to load is deleted.
    DownloadError: a known name could not be downloaded intact.
  """
  path = resolve(path_or_name, cache_dir)
  try:
    model, variables = from_state_dict(read_state_dict(path), source=str(path), dtype=dtype)
  except CheckpointError as e:
    if not weights.is_known(path_or_name, "backbone"):
      raise
    raise weights.discard_download(path, e) from e
  return model, jax.tree.map(jnp.asarray, variables)

"""Official MAE state dicts <-> Flax parameter trees, and the Hugging Face renames.

The Flax modules are named after the official PyTorch keys, so the conversion is
mechanical: `blocks.3.attn.qkv.weight` (out, in) becomes `blocks_3/attn/qkv/kernel`
(in, out); conv weights go from OIHW to HWIO; LayerNorm `weight` becomes `scale`.
"""

import re

import numpy as np
from flax import traverse_util

from maeday_jax.weight_files.errors import CheckpointError

# Keys that only exist in checkpoints with the decoder the method needs.
DECODER_KEYS = ("mask_token", "decoder_embed.weight", "decoder_pred.weight")


def _is_norm(module_name: str) -> bool:
  return module_name in ("norm", "norm1", "norm2", "decoder_norm")


def official_key_to_path(key: str, ndim: int) -> tuple[str, ...]:
  """Maps an official PyTorch key to its Flax parameter path."""
  parts = key.split(".")
  merged: list[str] = []
  i = 0
  while i < len(parts):
    # `blocks.3` -> `blocks_3`, `decoder_blocks.0` -> `decoder_blocks_0`.
    if i + 1 < len(parts) and parts[i + 1].isdigit():
      merged.append(f"{parts[i]}_{parts[i + 1]}")
      i += 2
    else:
      merged.append(parts[i])
      i += 1
  leaf = merged[-1]
  if leaf == "weight":
    if len(merged) >= 2 and _is_norm(merged[-2]):
      merged[-1] = "scale"
    elif ndim in (2, 4):
      merged[-1] = "kernel"
  return tuple(merged)


def _to_flax_layout(key: str, value: np.ndarray) -> np.ndarray:
  if key.endswith(".weight") and value.ndim == 2:
    return value.T  # Linear (out, in) -> Dense (in, out).
  if key.endswith(".weight") and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # Conv OIHW -> HWIO.
  return value


def _from_flax_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  if path[-1] == "kernel" and value.ndim == 2:
    return value.T
  if path[-1] == "kernel" and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value


def path_to_official_key(path: tuple[str, ...]) -> str:
  """Inverse of `official_key_to_path`."""
  parts = []
  for name in path:
    match = re.fullmatch(r"(blocks|decoder_blocks)_(\d+)", name)
    parts.extend([match.group(1), match.group(2)] if match else [name])
  if parts[-1] in ("kernel", "scale"):
    parts[-1] = "weight"
  return ".".join(parts)


def to_params(state: dict[str, np.ndarray], expected, source: str) -> dict:
  """Converts an official state dict to a Flax parameter tree, checking every leaf.

  Args:
    state: official key -> array.
    expected: the model's parameter tree of `jax.ShapeDtypeStruct`s (`param_shapes`).
    source: the checkpoint's name, for error messages.

  Raises:
    CheckpointError: listing missing keys, unexpected keys and shape mismatches together.
  """
  expected_flat = traverse_util.flatten_dict(expected)
  converted, unexpected, mismatched = {}, [], []
  for key, value in state.items():
    path = official_key_to_path(key, np.ndim(value))
    if path not in expected_flat:
      unexpected.append(key)
      continue
    array = np.asarray(_to_flax_layout(key, np.asarray(value)), dtype=np.float32)
    if array.shape != tuple(expected_flat[path].shape):
      want = _from_flax_layout(path, np.empty(expected_flat[path].shape, np.uint8)).shape
      mismatched.append(f"{key}: file {tuple(np.shape(value))}, model {want}")
      continue
    converted[path] = array
  missing = [path_to_official_key(p) for p in expected_flat if p not in converted]
  missing = [k for k in missing if k not in {m.split(":")[0] for m in mismatched}]
  if missing or unexpected or mismatched:
    lines = [f"{source}: the checkpoint does not match the MAE architecture."]
    for title, items in (
      ("missing keys", missing),
      ("unexpected keys", unexpected),
      ("shape mismatches", mismatched),
    ):
      if items:
        shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        lines.append(f"  {title}: {shown}")
    lines.append(
      "  Pass an official MAE checkpoint with its decoder (mae_visualize_vit_*.pth), a Hugging "
      "Face ViTMAEForPreTraining safetensors file, or a directory written by "
      "tools/convert_checkpoint.py; set num_heads/decoder_num_heads if they differ."
    )
    raise CheckpointError("\n".join(lines))
  return traverse_util.unflatten_dict(converted)


def from_params(params) -> dict[str, np.ndarray]:
  """Flax parameter tree -> official state dict (NumPy), e.g. to export weights."""
  flat = traverse_util.flatten_dict(params)
  return {
    path_to_official_key(path): np.asarray(_from_flax_layout(path, np.asarray(value)))
    for path, value in flat.items()
  }


# Hugging Face ViTMAEForPreTraining -> official names. Order matters: longest first.
_HF_LAYER_RENAMES = (
  ("attention.output.dense", "attn.proj"),
  ("intermediate.dense", "mlp.fc1"),
  ("output.dense", "mlp.fc2"),
  ("layernorm_before", "norm1"),
  ("layernorm_after", "norm2"),
)
_HF_TOP_RENAMES = {
  "vit.embeddings.cls_token": "cls_token",
  "vit.embeddings.position_embeddings": "pos_embed",
  "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
  "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
  "vit.layernorm.weight": "norm.weight",
  "vit.layernorm.bias": "norm.bias",
  "decoder.mask_token": "mask_token",
  "decoder.decoder_pos_embed": "decoder_pos_embed",
}
_HF_LAYER = re.compile(r"^(vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)$")


def is_hugging_face(state: dict) -> bool:
  return any(k.startswith(("vit.", "decoder.decoder_")) for k in state)


def hugging_face_to_official(state: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """Renames a `ViTMAEForPreTraining` state dict to official keys (fusing q, k, v)."""
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for key, value in state.items():
    if key in _HF_TOP_RENAMES:
      out[_HF_TOP_RENAMES[key]] = value
      continue
    if key.startswith("decoder.") and key.count(".") == 2:
      # decoder.decoder_embed.weight -> decoder_embed.weight (also norm and pred).
      out[key[len("decoder.") :]] = value
      continue
    match = _HF_LAYER.match(key)
    if not match:
      out[key] = value  # Reported as unexpected by `to_params`.
      continue
    stack = "blocks" if match.group(1).startswith("vit") else "decoder_blocks"
    prefix, rest = f"{stack}.{match.group(2)}", match.group(3)
    qkv_match = re.fullmatch(r"attention\.attention\.(query|key|value)\.(weight|bias)", rest)
    if qkv_match:
      qkv.setdefault((prefix, qkv_match.group(2)), {})[qkv_match.group(1)] = value
      continue
    for old, new in _HF_LAYER_RENAMES:
      if rest.startswith(old):
        rest = new + rest[len(old) :]
        break
    out[f"{prefix}.{rest}"] = value
  for (prefix, kind), parts in qkv.items():
    if set(parts) != {"query", "key", "value"}:
      raise CheckpointError(
        f"{source}: {prefix} has only {sorted(parts)} of query/key/value {kind}s."
      )
    out[f"{prefix}.attn.qkv.{kind}"] = np.concatenate(
      [parts["query"], parts["key"], parts["value"]], axis=0
    )
  return out

"""DINOv2 weights: the official `.pth`, timm and Hugging Face `Dinov2Model` files -> Flax.

    model, params = load_dinov2("dinov2_vits14")          # or a local .pth / .safetensors

Every file goes through the memory-safe reader (`weight_files.state_dicts`: no pickle
code runs). Keys are first brought to the official layout (timm's names differ for the
register tokens and the SwiGLU MLP, Hugging Face's everywhere), then renamed and
transposed into the Flax tree of `models.dinov2.DinoV2` (Linear (out, in) -> kernel
(in, out), Conv OIHW -> HWIO, LayerNorm weight -> scale). The architecture is read from
the shapes; a tensor that is missing, of another shape, or left over is an error naming
it (the official `mask_token`, used only in training, is the one key ignored).
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from maeday_jax.models import dinov2, param_trees, weights
from maeday_jax.weight_files.errors import CheckpointError
from maeday_jax.weight_files.state_dicts import read_state_dict

# Official widths -> heads (`dinov2/hub/backbones.py`); others get 64-wide heads.
_HEADS = {384: 6, 768: 12, 1024: 16, 1536: 24}
_IGNORED = ("mask_token",)


def _from_huggingface(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`Dinov2Model` keys -> official keys (query/key/value joined into qkv)."""
  renames = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (r"^encoder\.layer\.(\d+)\.mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"^layernorm\.", "norm."),
  ]
  out: dict[str, np.ndarray] = {}
  for key, value in state.items():
    match = re.match(
      r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)$", key
    )
    if match:
      continue  # Joined below.
    for pattern, replacement in renames:
      if re.match(pattern, key):
        key = re.sub(pattern, replacement, key)
        break
    out[key] = value
  layers = {int(m.group(1)) for k in state if (m := re.match(r"^encoder\.layer\.(\d+)\.", k))}
  for i in sorted(layers):
    prefix = f"encoder.layer.{i}.attention.attention"
    for part in ("weight", "bias"):
      names = [f"{prefix}.{qkv}.{part}" for qkv in ("query", "key", "value")]
      if all(n in state for n in names):
        out[f"blocks.{i}.attn.qkv.{part}"] = np.concatenate([state[n] for n in names], axis=0)
  if "mask_token" in out and out["mask_token"].ndim == 3:
    out["mask_token"] = out["mask_token"][0]
  return out


def _from_timm(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """timm keys -> official keys: `reg_token`, and the SwiGLU MLP's separate gate and
  value projections (`fc1_g`, `fc1_x`, `fc2`) joined as `w12` (gate first) and `w3`."""
  out = {("register_tokens" if k == "reg_token" else k): v for k, v in state.items()}
  for key in [k for k in out if k.endswith(".mlp.fc1_g.weight")]:
    block = key[: -len(".fc1_g.weight")]
    for part in ("weight", "bias"):
      gate, value = out.pop(f"{block}.fc1_g.{part}"), out.pop(f"{block}.fc1_x.{part}")
      out[f"{block}.w12.{part}"] = np.concatenate([gate, value], axis=0)
      out[f"{block}.w3.{part}"] = out.pop(f"{block}.fc2.{part}")
  return out


def official_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any supported layout (official, training `teacher`/`backbone.` prefixes, chunked
  blocks, timm, Hugging Face) as official keys."""
  if any(k.startswith("embeddings.") or k.startswith("encoder.layer.") for k in state):
    state = _from_huggingface(state)
  elif "reg_token" in state or any(".mlp.fc1_g." in k for k in state):
    state = _from_timm(state)
  if state and all(k.startswith("backbone.") for k in state):
    state = {k[len("backbone.") :]: v for k, v in state.items()}
  # Training checkpoints group blocks in chunks: blocks.<chunk>.<i>.* -> blocks.<i>.*
  return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state.items()}


def infer_architecture(state: dict[str, np.ndarray], source: str) -> dict[str, Any]:
  """The `DinoV2` fields of an official-layout state dict (`official_layout`)."""
  if "blocks.0.ls1.gamma" not in state or "decoder_embed.weight" in state:
    raise CheckpointError(
      f"{source}: not a DINOv2 checkpoint (no layer scale blocks.0.ls1.gamma"
      f"{'; it has an MAE decoder' if 'decoder_embed.weight' in state else ''})."
    )
  try:
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid2 = state["pos_embed"].shape[1] - 1
  except KeyError as e:
    raise CheckpointError(f"{source}: not a DINOv2 checkpoint (no {e.args[0]}).") from None
  grid = int(round(grid2**0.5))
  if grid * grid != grid2:
    raise CheckpointError(f"{source}: pos_embed holds {grid2} patch positions, not a square grid.")
  depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k)))
  registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
  return dict(
    img_size=grid * patch,
    patch_size=patch,
    embed_dim=width,
    depth=depth,
    num_heads=_HEADS.get(width, max(1, width // 64)),
    mlp_ratio=4.0,
    ffn="swiglu" if "blocks.0.mlp.w12.weight" in state else "mlp",
    num_register_tokens=registers,
    # The official convention: the `_reg` models resize positions with antialias, no offset.
    interpolate_offset=0.0 if registers else 0.1,
    interpolate_antialias=bool(registers),
  )


def _flax_name(key: str) -> tuple[tuple[str, ...], str]:
  """An official key -> (Flax path, how to convert the tensor)."""
  parts = key.split(".")
  if parts[0] == "blocks":
    parts = [f"blocks_{parts[1]}", *parts[2:]]
  if parts[:2] == ["patch_embed", "proj"]:
    parts = ["patch_embed", *parts[2:]]
  leaf = parts[-1]
  if leaf in ("cls_token", "pos_embed", "register_tokens", "gamma"):
    return tuple(parts), "copy"
  norm = parts[-2] in ("norm", "norm1", "norm2")
  if leaf == "weight":
    if norm:
      return (*parts[:-1], "scale"), "copy"
    return (*parts[:-1], "kernel"), "conv" if parts[0] == "patch_embed" else "linear"
  return tuple(parts), "copy"  # bias


def read_checkpoint(
  name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any], str]:
  """(official-layout state dict, inferred architecture, source) of a known name (downloaded
  once) or a file / Hugging Face model folder."""
  path = weights.resolve(name_or_path, cache_dir, kind="dinov2")
  if path.is_dir():
    path = path / "model.safetensors"
  state = official_layout(read_state_dict(path))
  return state, infer_architecture(state, str(path)), str(path)


def build(state, arch: dict, source: str, *, dtype: Any = jnp.float32, attention: str = "auto"):
  """(model, params) of `read_checkpoint`'s state dict and architecture."""
  return param_trees.build(
    lambda: dinov2.DinoV2(**arch, dtype=dtype, attention=attention),
    dinov2.param_shapes,
    state,
    source,
    "DINOv2",
    _flax_name,
    ignored=_IGNORED,
  )


def load_dinov2(
  name_or_path: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  attention: str = "auto",
  cache_dir: str | os.PathLike | None = None,
  num_heads: int | None = None,
) -> tuple[dinov2.DinoV2, dict]:
  """Loads a DINOv2; returns `(model, params)`.

  Args:
    name_or_path: a known name (`dinov2_vits14`, ..., `dinov2_vitg14_reg`: downloaded
      once into the cache) or an official / timm `.pth` or safetensors file, or a Hugging
      Face `Dinov2Model` safetensors file or model folder (its `model.safetensors`).
    dtype, attention: the compute dtype and attention implementation.
    cache_dir: the download cache (default `$MAEDAY_CACHE_DIR` or ~/.cache/maeday_jax).
    num_heads: override the inferred head count (not in the tensor shapes).

  Raises:
    CheckpointError: the file is unreadable, not a DINOv2, or not the inferred shape.
  """
  state, arch, source = read_checkpoint(name_or_path, cache_dir)
  if num_heads:
    arch["num_heads"] = num_heads
  return build(state, arch, source, dtype=dtype, attention=attention)

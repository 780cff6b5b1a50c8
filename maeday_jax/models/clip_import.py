"""CLIP weights: open_clip state dicts and Hugging Face `CLIPModel` files -> Flax.

    model, params = load_clip("clip_vit_b16")           # or a file / a model folder

Every file goes through the memory-safe reader (`weight_files.state_dicts`: no pickle
code runs): `.safetensors`, and `.bin` / `.pth` zip archives. Keys are first brought to
open_clip's layout (the OpenAI layout: `visual.transformer.resblocks.{i}.attn.in_proj_weight`,
`token_embedding.weight`, `text_projection`, ...; Hugging Face's q/k/v projections are
joined into `in_proj`), then renamed and transposed into the tree of `models.clip.CLIP`
(Linear (out, in) -> kernel (in, out), Conv OIHW -> HWIO, LayerNorm weight -> scale;
`proj` and `text_projection` are used as `x @ proj` in both). The architecture is read
from the shapes; the head counts and the activation, which shapes do not hold, from the
folder's `config.json` (Hugging Face) or `open_clip_config.json`, else 64-wide heads and
quick-GELU (OpenAI's weights). A tensor that is missing, of another shape or left over is
an error naming it.

OpenAI's original `.pt` files are TorchScript archives (pickled code): they are refused
with the formats to convert them to.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import zipfile
from typing import Any

import jax.numpy as jnp
import numpy as np

from maeday_jax.models import clip, param_trees, weights
from maeday_jax.models.vit_layers import ACTIVATIONS
from maeday_jax.weight_files.errors import CheckpointError
from maeday_jax.weight_files.state_dicts import read_state_dict

# Bookkeeping entries some files carry beside the tensors (OpenAI's state dict, buffers).
_IGNORED = re.compile(
  r"^(input_resolution|context_length|vocab_size|attn_mask|"
  r"(text|vision)_model\.embeddings\.position_ids)$"
)
# The weights file of a model folder, in order of preference.
_FOLDER_FILES = (
  "model.safetensors",
  "open_clip_model.safetensors",
  "open_clip_pytorch_model.bin",
  "pytorch_model.bin",
)
_NAMES = ("clip_vit_b16", "clip_vit_l14", "clip_vit_l14_336")


def _hf_tower(state: dict, hf: str, ours: str, out: dict) -> None:
  """One Hugging Face encoder's layers -> open_clip resblocks (q, k, v joined)."""
  layers = {int(m.group(1)) for k in state if (m := re.match(rf"^{hf}encoder\.layers\.(\d+)\.", k))}
  renames = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
  }
  for i in sorted(layers):
    source, target = f"{hf}encoder.layers.{i}.", f"{ours}transformer.resblocks.{i}."
    for part in ("weight", "bias"):
      names = [f"{source}self_attn.{p}_proj.{part}" for p in "qkv"]
      if all(n in state for n in names):
        out[f"{target}attn.in_proj_{part}"] = np.concatenate([state[n] for n in names], 0)
      for theirs, mine in renames.items():
        if f"{source}{theirs}.{part}" in state:
          out[f"{target}{mine}.{part}"] = state[f"{source}{theirs}.{part}"]


def _from_huggingface(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`CLIPModel` keys -> open_clip keys."""
  out: dict[str, np.ndarray] = {}
  _hf_tower(state, "vision_model.", "visual.", out)
  _hf_tower(state, "text_model.", "", out)
  v, t = "vision_model.", "text_model."
  renames = {
    f"{v}embeddings.class_embedding": "visual.class_embedding",
    f"{v}embeddings.patch_embedding.weight": "visual.conv1.weight",
    f"{v}embeddings.position_embedding.weight": "visual.positional_embedding",
    f"{t}embeddings.token_embedding.weight": "token_embedding.weight",
    f"{t}embeddings.position_embedding.weight": "positional_embedding",
    "logit_scale": "logit_scale",
    **{f"{v}pre_layrnorm.{p}": f"visual.ln_pre.{p}" for p in ("weight", "bias")},
    **{f"{v}post_layernorm.{p}": f"visual.ln_post.{p}" for p in ("weight", "bias")},
    **{f"{t}final_layer_norm.{p}": f"ln_final.{p}" for p in ("weight", "bias")},
  }
  for theirs, mine in renames.items():
    if theirs in state:
      out[mine] = state[theirs]
  # Hugging Face's projections are Linear layers (out, in); open_clip's are x @ proj.
  projections = {
    "visual_projection.weight": "visual.proj",
    "text_projection.weight": "text_projection",
  }
  for theirs, mine in projections.items():
    if theirs in state:
      out[mine] = state[theirs].T
  used = re.compile(
    r"^(vision_model\.encoder\.layers\.\d+\.|text_model\.encoder\.layers\.\d+\.)"
    r"(self_attn\.[qkvo]\w*_proj|layer_norm[12]|mlp\.fc[12])\.(weight|bias)$"
  )
  for key, value in state.items():  # Left-overs stay, to be named as unused.
    if key not in renames and not used.match(key) and not key.endswith("_projection.weight"):
      out[key] = value
  return out


def official_layout(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any supported layout (open_clip / OpenAI, Hugging Face `CLIPModel`) as open_clip keys,
  bookkeeping entries dropped."""
  if any(k.startswith(("vision_model.", "text_model.")) for k in state):
    state = _from_huggingface(state)
  return {k: v for k, v in state.items() if not _IGNORED.match(k)}


def _config(folder: pathlib.Path | None) -> dict[str, Any]:
  """Heads and activation from a folder's `config.json` (Hugging Face) or
  `open_clip_config.json`; {} when there is neither."""
  if folder is None:
    return {}
  found: dict[str, Any] = {}
  hf, oc = folder / "config.json", folder / "open_clip_config.json"
  try:
    if hf.is_file():
      config = json.loads(hf.read_text(encoding="utf-8"))
      text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
      found["activation"] = vision.get("hidden_act") or text.get("hidden_act") or "quick_gelu"
      found["vision_heads"] = vision.get("num_attention_heads")
      found["text_heads"] = text.get("num_attention_heads")
    elif oc.is_file():
      config = json.loads(oc.read_text(encoding="utf-8")).get("model_cfg", {})
      found["activation"] = "quick_gelu" if config.get("quick_gelu") else "gelu"
      vision, text = config.get("vision_cfg") or {}, config.get("text_cfg") or {}
      if vision.get("width") and vision.get("head_width"):
        found["vision_heads"] = vision["width"] // vision["head_width"]
      found["text_heads"] = text.get("heads")
  except (OSError, ValueError, AttributeError, TypeError) as e:
    raise CheckpointError(f"{folder}: unreadable model config ({e}).") from e
  if found.get("activation") not in (None, *ACTIVATIONS):
    raise CheckpointError(
      f"{folder}: activation {found['activation']!r}; CLIP here runs 'gelu' or 'quick_gelu'."
    )
  return {k: v for k, v in found.items() if v}


def infer_architecture(
  state: dict[str, np.ndarray], source: str, config: dict | None = None
) -> dict[str, Any]:
  """The `CLIP` fields of an open_clip-layout state dict (`official_layout`); `config`
  (`_config`) gives the head counts and activation, else 64-wide heads, quick-GELU."""
  needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj")
  needed += ("token_embedding.weight", "positional_embedding", "text_projection")
  missing = [k for k in needed if k not in state]
  if missing:
    what = "no image tower" if any(k.startswith("visual.") for k in missing) else "no text tower"
    raise CheckpointError(
      f"{source}: not a CLIP checkpoint with both towers ({what}: {', '.join(missing[:3])})."
    )
  width, _, patch, _ = state["visual.conv1.weight"].shape
  positions = state["visual.positional_embedding"].shape[0] - 1
  grid = int(round(positions**0.5))
  if grid * grid != positions:
    raise CheckpointError(
      f"{source}: visual.positional_embedding holds {positions} patch positions, not a square "
      "grid (a class token and a square image expected)."
    )
  vocab, text_width = state["token_embedding.weight"].shape

  def depth(prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"^{prefix}(\d+)\.", k))}
    return 1 + max(found) if found else 0

  hidden = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
  config = config or {}
  return dict(
    image_size=grid * patch,
    patch_size=patch,
    vision_width=width,
    vision_layers=depth(r"visual\.transformer\.resblocks\."),
    vision_heads=config.get("vision_heads") or max(1, width // 64),
    embed_dim=state["visual.proj"].shape[1],
    context_length=state["positional_embedding"].shape[0],
    vocab_size=vocab,
    text_width=text_width,
    text_layers=depth(r"transformer\.resblocks\."),
    text_heads=config.get("text_heads") or max(1, text_width // 64),
    mlp_ratio=hidden.shape[0] / width if hidden is not None else 4.0,
    activation=config.get("activation", "quick_gelu"),
  )


def _flax_name(key: str) -> tuple[tuple[str, ...], str]:
  """An open_clip key -> (Flax path, how to convert the tensor)."""
  parts = key.split(".")
  if parts[0] == "visual" and parts[1:3] == ["transformer", "resblocks"]:
    parts = ["visual", f"blocks_{parts[3]}", *parts[4:]]
  elif parts[:2] == ["transformer", "resblocks"]:
    parts = [f"text_blocks_{parts[2]}", *parts[3:]]
  block = {"ln_1": "norm1", "ln_2": "norm2", "c_fc": "fc1", "c_proj": "fc2", "out_proj": "proj"}
  parts = [block.get(p, p) for p in parts]
  if parts[-1] in ("in_proj_weight", "in_proj_bias"):
    leaf = "kernel" if parts[-1].endswith("weight") else "bias"
    return (*parts[:-1], "qkv", leaf), "linear" if leaf == "kernel" else "copy"
  if parts[-2:] == ["token_embedding", "weight"]:
    return ("token_embedding", "embedding"), "copy"
  if parts[-1] == "weight":
    if parts[-2].startswith(("ln", "norm")):
      return (*parts[:-1], "scale"), "copy"
    return (*parts[:-1], "kernel"), "conv" if parts[-2] == "conv1" else "linear"
  return tuple(parts), "copy"  # biases, embeddings, proj, text_projection, logit_scale


def _refuse_torchscript(path: pathlib.Path) -> None:
  """OpenAI's `.pt` files pickle TorchScript code: refused before anything is read."""
  if not zipfile.is_zipfile(path):
    return
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
  if any("/code/" in n or n.endswith("constants.pkl") for n in names):
    raise CheckpointError(
      f"{path}: a TorchScript archive (OpenAI's original .pt files hold pickled code, which "
      "is never run here). Use a Hugging Face CLIPModel model.safetensors instead (the "
      f"known names {', '.join(_NAMES)} download them), or convert this file once with "
      "open_clip: torch.save(open_clip.create_model('ViT-B-16', pretrained='<this .pt>')"
      ".state_dict(), 'clip.pth') (ViT-L-14 / ViT-L-14-336 for the large models)."
    )


def weights_file(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(the weights file, its model folder or None) of a file or a model folder."""
  if not path.is_dir():
    return path, None
  for name in _FOLDER_FILES:
    if (path / name).is_file():
      return path / name, path
  raise CheckpointError(
    f"{path}: a folder without CLIP weights (none of {', '.join(_FOLDER_FILES)})."
  )


def read_checkpoint(
  name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any], str, pathlib.Path | None]:
  """(open_clip-layout state dict, inferred architecture, source, model folder or None) of
  a known name (downloaded once) or a file / model folder."""
  path, folder = weights_file(weights.resolve(name_or_path, cache_dir, kind="clip"))
  _refuse_torchscript(path)
  state = official_layout(read_state_dict(path))
  return state, infer_architecture(state, str(path), _config(folder)), str(path), folder


def _scalar_logit_scale(key: str, value: np.ndarray) -> np.ndarray:
  # Some files keep the temperature as a (1,) tensor.
  return value.reshape(()) if key == "logit_scale" and value.size == 1 else value


def build(state, arch: dict, source: str, *, dtype: Any = jnp.float32, attention: str = "auto"):
  """(model, params) of `read_checkpoint`'s state dict and architecture."""
  return param_trees.build(
    lambda: clip.CLIP(**arch, dtype=dtype, attention=attention),
    clip.param_shapes,
    state,
    source,
    "CLIP",
    _flax_name,
    adjust=_scalar_logit_scale,
  )


def load_clip(
  name_or_path: str | os.PathLike,
  *,
  dtype: Any = jnp.float32,
  attention: str = "auto",
  cache_dir: str | os.PathLike | None = None,
  **overrides,
) -> tuple[clip.CLIP, dict]:
  """Loads a CLIP; returns `(model, params)`.

  Args:
    name_or_path: a known name (`clip_vit_b16`, `clip_vit_l14`, `clip_vit_l14_336`:
      downloaded once into the cache), an open_clip state dict (`.safetensors`, `.bin`,
      `.pth`), a Hugging Face `CLIPModel` `model.safetensors`, or a model folder (its
      `config.json` / `open_clip_config.json` give the heads and the activation).
    dtype, attention: the compute dtype and attention implementation.
    cache_dir: the download cache (default `$MAEDAY_CACHE_DIR` or ~/.cache/maeday_jax).
    **overrides: architecture fields the file does not settle (`vision_heads`,
      `text_heads`, `activation`).

  Raises:
    CheckpointError: the file is unreadable, TorchScript, not a CLIP, or not the inferred
      shape.
  """
  state, arch, source, _ = read_checkpoint(name_or_path, cache_dir)
  return build(state, {**arch, **overrides}, source, dtype=dtype, attention=attention)

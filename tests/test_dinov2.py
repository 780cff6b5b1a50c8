"""The DINOv2 port against the independent PyTorch reference (tools/references/
torch_dinov2_reference.py): every block's tokens at the training size, a non-square size
and a larger one (position tables resized as the official code does, with and without
antialias), the three weight layouts, the entry point and its errors."""

from __future__ import annotations

import hashlib

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from maeday_jax import models
from maeday_jax.models import dinov2, dinov2_import, weights
from maeday_jax.weight_files.errors import CheckpointError
from maeday_jax.weight_files.state_dicts import read_state_dict

SIZES = ("56x56", "42x84", "112x112")


def _relative(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("key", ["a", "b"])
def test_every_block_matches_the_reference_at_every_size(fixtures_dir, key):
  """a: the original models' resizing (offset 0.1, no antialias), MLP; b: the `_reg`
  models' (registers, antialias, no offset) with ViT-g's SwiGLU MLP."""
  model, params = dinov2_import.load_dinov2(fixtures_dir / f"dinov2_ref_{key}.pth", num_heads=3)
  assert model.ffn == ("mlp" if key == "a" else "swiglu")
  assert model.num_register_tokens == (0 if key == "a" else 4)
  for size in SIZES:
    io = np.load(fixtures_dir / f"dinov2_ref_{key}_{size}.npz")
    blocks = model.apply({"params": params}, io["images"])
    assert len(blocks) == 3
    for i, tokens in enumerate(blocks):
      assert _relative(tokens, io[f"block_{i}"]) < 1e-4, (size, i)
    normed = model.apply({"params": params}, blocks[-1], method="normalize")
    assert _relative(normed, io["normed"]) < 1e-4, size


def test_patch_tokens_entry_point(fixtures_dir):
  net = models.load("dinov2_test_reg", checkpoint=fixtures_dir / "dinov2_ref_b.pth")
  io = np.load(fixtures_dir / "dinov2_ref_b_42x84.npz")
  tokens = net.patch_tokens(io["images"], layers=(0, 2))
  assert sorted(tokens) == [0, 2] and tokens[2].shape == (2, 3, 6, 48)
  # Class token and 4 registers come first in the sequence; patches row by row.
  expected = io["block_2"][:, 5:].reshape(2, 3, 6, 48)
  assert _relative(tokens[2], expected) < 1e-4
  last = net.patch_tokens(io["images"], layers=(-1,), norm=True)[2]
  assert _relative(last, io["normed"][:, 5:].reshape(2, 3, 6, 48)) < 1e-4
  assert _relative(net.class_token(io["images"]), io["normed"][:, 0]) < 1e-4
  with pytest.raises(ValueError, match="has layers 0 to 2"):
    net.patch_tokens(io["images"], layers=(3,))
  with pytest.raises(ValueError, match="multiples of 14"):
    net.patch_tokens(np.zeros((1, 50, 56, 3), np.float32))


def test_another_architecture_is_named(fixtures_dir):
  with pytest.raises(CheckpointError, match="ffn expected mlp, found swiglu"):
    models.load("dinov2_test", checkpoint=fixtures_dir / "dinov2_ref_b.pth")
  with pytest.raises(CheckpointError, match="not a DINOv2 checkpoint"):
    models.load("dinov2_test", checkpoint=fixtures_dir / "mae_ref_a.pth")


def _huggingface(state: dict) -> dict:
  """The official keys written as transformers' `Dinov2Model` names them (by hand)."""
  out = {
    "embeddings.cls_token": state["cls_token"],
    "embeddings.mask_token": state["mask_token"][None],
    "embeddings.position_embeddings": state["pos_embed"],
    "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
    "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
    "layernorm.weight": state["norm.weight"],
    "layernorm.bias": state["norm.bias"],
  }
  if "register_tokens" in state:
    out["embeddings.register_tokens"] = state["register_tokens"]
  for i in range(3):
    b, e = f"blocks.{i}.", f"encoder.layer.{i}."
    for part in ("weight", "bias"):
      q, k, v = np.split(state[b + f"attn.qkv.{part}"], 3, axis=0)
      out[e + f"attention.attention.query.{part}"] = q
      out[e + f"attention.attention.key.{part}"] = k
      out[e + f"attention.attention.value.{part}"] = v
      out[e + f"attention.output.dense.{part}"] = state[b + f"attn.proj.{part}"]
      for norm in ("norm1", "norm2"):
        out[e + f"{norm}.{part}"] = state[b + f"{norm}.{part}"]
      if b + "mlp.w12.weight" in state:
        out[e + f"mlp.weights_in.{part}"] = state[b + f"mlp.w12.{part}"]
        out[e + f"mlp.weights_out.{part}"] = state[b + f"mlp.w3.{part}"]
      else:
        out[e + f"mlp.fc1.{part}"] = state[b + f"mlp.fc1.{part}"]
        out[e + f"mlp.fc2.{part}"] = state[b + f"mlp.fc2.{part}"]
    out[e + "layer_scale1.lambda1"] = state[b + "ls1.gamma"]
    out[e + "layer_scale2.lambda1"] = state[b + "ls2.gamma"]
  return out


def _timm(state: dict) -> dict:
  """The official keys as timm names them: `reg_token`, and a SwiGLU MLP's gate and
  value halves as `fc1_g` and `fc1_x`, its output as `fc2`."""
  out = {}
  for key, value in state.items():
    if key == "register_tokens":
      out["reg_token"] = value
    elif ".mlp.w12." in key:
      gate, rest = np.split(value, 2, axis=0)
      out[key.replace(".w12.", ".fc1_g.")] = gate
      out[key.replace(".w12.", ".fc1_x.")] = rest
    elif ".mlp.w3." in key:
      out[key.replace(".w3.", ".fc2.")] = value
    else:
      out[key] = value
  return out


@pytest.mark.parametrize("key", ["a", "b"])
@pytest.mark.parametrize("layout", ["huggingface", "timm"])
def test_huggingface_and_timm_files_load_to_the_same_parameters(
  fixtures_dir, tmp_path, key, layout
):
  state = read_state_dict(fixtures_dir / f"dinov2_ref_{key}.pth")
  converted = (_huggingface if layout == "huggingface" else _timm)(state)
  path = tmp_path / "model.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in converted.items()}, str(path))
  _, expected = dinov2_import.load_dinov2(fixtures_dir / f"dinov2_ref_{key}.pth", num_heads=3)
  source = tmp_path if layout == "huggingface" else path  # A Hugging Face model folder.
  _, params = dinov2_import.load_dinov2(source, num_heads=3)
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_known_names_download_once_and_load(fixtures_dir, file_server, monkeypatch, tmp_path):
  payload = (fixtures_dir / "dinov2_ref_a.pth").read_bytes()
  server = file_server({"dinov2_ref_a.pth": payload})
  entry = weights.Weights(
    f"{server.url}/dinov2_ref_a.pth", "dinov2", sha256=hashlib.sha256(payload).hexdigest()
  )
  monkeypatch.setitem(weights.KNOWN, "dinov2_test", entry)
  net = models.load("dinov2_test", cache_dir=tmp_path)
  again = models.load("dinov2_test", cache_dir=tmp_path)
  assert len(server.requests) == 1  # The second load reads the cache.
  assert (tmp_path / "dinov2" / "dinov2_ref_a.pth").read_bytes() == payload
  jax.tree.map(np.testing.assert_array_equal, net.params, again.params)


def test_official_names_point_to_the_published_files():
  for size in ("vits14", "vitb14", "vitl14", "vitg14"):
    assert weights.KNOWN[f"dinov2_{size}"].url.endswith(
      f"/dinov2_{size}/dinov2_{size}_pretrain.pth"
    )
    reg = weights.KNOWN[f"dinov2_{size}_reg"].url
    assert reg.endswith(f"/dinov2_{size}/dinov2_{size}_reg4_pretrain.pth")
    assert dinov2.VARIANTS[size]["img_size"] == 518


def test_resize_matrix_rows_are_interpolation_weights():
  """Shrinking and growing: rows sum to one; the no-offset identity keeps the table."""
  for antialias in (False, True):
    for out in (3, 5, 9):
      m = dinov2.resize_matrix(5, out, None, antialias)
      np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(dinov2.resize_matrix(4, 4, None, True), np.eye(4), atol=1e-12)


def test_the_entry_point_serves_maes_and_resnets(fixtures_dir):
  """`models.load` also gives the MAE's encoder (every patch visible; its blocks are
  proven against PyTorch by the MAE fixtures) and ResNet stages."""
  mae = models.load("mae_test", checkpoint=fixtures_dir / "mae_ref_a.pth")
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  tokens = mae.patch_tokens(images, layers=(0, -1))
  depth = mae.model.depth
  assert sorted(tokens) == [0, depth - 1] and tokens[0].shape == (2, 4, 4, 128)
  order = np.broadcast_to(np.arange(16), (2, 16))
  first, last = mae.model.apply(
    {"params": mae.params}, images, order, method=mae.model.encode_tokens
  )
  np.testing.assert_allclose(tokens[0], np.asarray(first)[:, 1:].reshape(2, 4, 4, 128), atol=1e-5)
  normed = mae.model.apply({"params": mae.params}, tokens[depth - 1], method=lambda m, x: m.norm(x))
  np.testing.assert_allclose(normed, np.asarray(last)[:, 1:].reshape(2, 4, 4, 128), atol=1e-5)
  net = models.load("test_resnet", checkpoint="random")
  stages = net.patch_tokens(np.zeros((1, 64, 64, 3), np.float32), layers=(1, 2))
  assert stages[1].shape[1:3] == (8, 8) and stages[2].shape[1:3] == (4, 4)
  with pytest.raises(ValueError, match="stages layer1 to layer4"):
    net.patch_tokens(np.zeros((1, 64, 64, 3), np.float32), layers=(4,))
  with pytest.raises(ValueError, match="Unknown feature network"):
    models.load("vgg16")

"""The CLIP port against open_clip and transformers (tools/references/torch_clip_reference.py):
image blocks and embeddings at the training size and another, text embeddings and the
logit scale, both weight layouts, the tokenizer's ids on 1307 prompts, the entry point,
the refusals and the download of a known name."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from maeday_jax import models
from maeday_jax.models import clip, clip_import, vit_layers, weights
from maeday_jax.models.clip_tokenizer import ClipTokenizer
from maeday_jax.models.features import ClipFeatures
from maeday_jax.weight_files.errors import CheckpointError
from maeday_jax.weight_files.state_dicts import read_state_dict

SIZES = ("32x32", "40x56")
SOURCES = ("clip_ref_openclip.pth", "clip_ref_hf", "clip_ref_hf/model.safetensors")


def _relative(ours, theirs) -> float:
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def net(fixtures_dir):
  return models.load("clip_test", checkpoint=fixtures_dir / "clip_ref_openclip.pth")


@pytest.fixture(scope="module")
def tokenizer():
  return ClipTokenizer.load()


@pytest.mark.parametrize("size", SIZES)
def test_image_tower_matches_open_clip(net, fixtures_dir, size):
  """Every block and the embedding; at 40 x 56 the reference resized its position table
  with open_clip's `resize_pos_embed` (bicubic, antialias) to a 5 x 7 grid."""
  io = np.load(fixtures_dir / f"clip_ref_{size}.npz")
  blocks = net.model.apply({"params": net.params}, io["images"], method="image_blocks")
  assert len(blocks) == 3
  for i, tokens in enumerate(blocks):
    assert _relative(tokens, io[f"block_{i}"]) < 1e-4, (size, i)
  assert _relative(net.encode_image(io["images"]), io["image_embeds"]) < 1e-4
  # The embedding is ln_post + proj of the last block's class token.
  projected = net.model.apply({"params": net.params}, blocks[-1], method="image_project")
  assert _relative(projected[:, 0], io["image_embeds"]) < 1e-4


def test_text_tower_and_logit_scale_match_open_clip(net, fixtures_dir):
  io = np.load(fixtures_dir / "clip_ref_32x32.npz")
  assert _relative(net.encode_text(io["ids"]), io["text_embeds"]) < 1e-4
  assert abs(float(net.logit_scale) - np.exp(io["logit_scale"])) < 1e-5
  # Causal: what follows the end token (the largest id) changes nothing, nor does
  # dropping the padding columns after the longest prompt.
  ids = io["ids"][:2].copy()
  ids[0, 6:] = 7
  np.testing.assert_allclose(net.encode_text(ids), io["text_embeds"][:2], rtol=0, atol=1e-5)
  short = net.encode_text(io["ids"][:2, :20])
  np.testing.assert_allclose(short, io["text_embeds"][:2], rtol=0, atol=1e-5)


@pytest.mark.parametrize("source", SOURCES[1:])
def test_huggingface_files_load_to_the_same_parameters(net, fixtures_dir, source):
  """transformers' `save_pretrained` folder (its config gives heads and activation) and
  its bare safetensors file hold the open_clip weights."""
  other = models.load("clip_test", checkpoint=fixtures_dir / source)
  jax.tree.map(np.testing.assert_array_equal, other.params, net.params)
  assert (other.model.activation, other.model.vision_heads, other.model.text_heads) == (
    "quick_gelu",
    2,
    2,
  )


def test_config_sets_the_activation_and_heads(fixtures_dir, tmp_path):
  folder = tmp_path / "model"
  shutil.copytree(fixtures_dir / "clip_ref_hf", folder)
  config = json.loads((folder / "config.json").read_text())
  config["vision_config"].update(hidden_act="gelu", num_attention_heads=4)
  config["text_config"].update(hidden_act="gelu", num_attention_heads=1)
  (folder / "config.json").write_text(json.dumps(config))
  model, _ = clip_import.load_clip(folder)
  assert (model.activation, model.vision_heads, model.text_heads) == ("gelu", 4, 1)
  config["vision_config"]["hidden_act"] = "relu"
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="activation 'relu'"):
    clip_import.load_clip(folder)


def test_patch_tokens_entry_point(net, fixtures_dir):
  io = np.load(fixtures_dir / "clip_ref_40x56.npz")
  tokens = net.patch_tokens(io["images"], layers=(0, 2))
  assert sorted(tokens) == [0, 2] and tokens[2].shape == (2, 5, 7, 32)
  # The class token first, then the patches row by row.
  assert _relative(tokens[0], io["block_0"][:, 1:].reshape(2, 5, 7, 32)) < 1e-4
  last = net.patch_tokens(io["images"], layers=(-1,), project=True)[2]
  assert last.shape == (2, 5, 7, 24)
  assert net.patch_tokens(io["images"], layers=(1,), norm=True)[1].shape == (2, 5, 7, 32)
  with pytest.raises(ValueError, match="has layers 0 to 2"):
    net.patch_tokens(io["images"], layers=(3,))
  with pytest.raises(ValueError, match="multiples of 8"):
    net.encode_image(np.zeros((1, 36, 32, 3), np.float32))
  assert net.num_layers == 3


def test_encode_text_takes_prompts(tokenizer):
  """Strings go through the packaged tokenizer ('' is a prompt); the tiny fixture model's
  512-token vocabulary refuses real ids by name."""
  model = clip.create("test", vocab_size=clip.VOCAB_SIZE)
  features = ClipFeatures(model, clip.init_params(model, jax.random.key(1)))
  prompts = ["a photo of a damaged bottle.", ""]
  embeds = features.encode_text(prompts)
  assert embeds.shape == (2, 24) and np.all(np.isfinite(embeds))
  np.testing.assert_allclose(embeds, features.encode_text(tokenizer(prompts)), atol=1e-5)
  np.testing.assert_allclose(embeds[1], features.encode_text("")[0], atol=1e-5)
  small = clip.create("test")
  tiny = ClipFeatures(small, clip.init_params(small, jax.random.key(1)))
  with pytest.raises(ValueError, match="outside this CLIP's vocabulary of 512"):
    tiny.encode_text("a photo")
  with pytest.raises(ValueError, match="context holds 77"):
    tiny.encode_text(np.ones((1, 78), np.int32))


def test_causal_attention_paths_agree():
  """The einsum path's mask and `jax.nn.dot_product_attention(is_causal=True)`."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  outs = []
  for attention in ("einsum", "xla"):
    layer = vit_layers.Attention(2, attention=attention, causal=True)
    params = layer.init(jax.random.key(1), x)
    outs.append(layer.apply(params, x))
    assert np.allclose(layer.apply(params, x.at[:, 5:].set(9.0))[:, :5], outs[-1][:, :5])
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


# ----------------------------------------------------------------------------- refusals


def test_torchscript_archives_are_refused(tmp_path):
  path = tmp_path / "ViT-B-16.pt"
  with zipfile.ZipFile(path, "w") as archive:
    for name in ("data.pkl", "constants.pkl", "code/__torch__/model.py", "version"):
      archive.writestr(f"ViT-B-16/{name}", b"x")
  with pytest.raises(CheckpointError, match="TorchScript.*model.safetensors.*open_clip"):
    models.load("clip_vit_b16", checkpoint=path)


def test_other_architectures_are_named(fixtures_dir, tmp_path):
  path = fixtures_dir / "clip_ref_openclip.pth"
  with pytest.raises(CheckpointError, match="patch_size expected 16, found 8"):
    models.load("clip_vit_b16", checkpoint=path)
  with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
    models.load("clip_test", checkpoint=fixtures_dir / "dinov2_ref_a.pth")
  state = read_state_dict(path)
  text_only = {k: np.array(v) for k, v in state.items() if not k.startswith("visual")}
  save_file(text_only, str(tmp_path / "text.safetensors"))
  with pytest.raises(CheckpointError, match="no image tower"):
    models.load("clip_test", checkpoint=tmp_path / "text.safetensors")
  state["visual.transformer.resblocks.1.mlp.c_fc.bias"] = np.zeros(64, np.float32)
  save_file({k: np.array(v) for k, v in state.items()}, str(tmp_path / "b.safetensors"))
  with pytest.raises(CheckpointError, match="c_fc.bias has shape"):
    models.load("clip_test", checkpoint=tmp_path / "b.safetensors")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="a folder without CLIP weights"):
    models.load("clip_test", checkpoint=tmp_path / "empty")
  with pytest.raises(ValueError, match="Unknown CLIP 'clip_vit_h14'"):
    models.load("clip_vit_h14")


# ------------------------------------------------------------------------ known names


def test_known_names_download_once_and_load(fixtures_dir, file_server, monkeypatch, tmp_path):
  payload = (fixtures_dir / "clip_ref_hf" / "model.safetensors").read_bytes()
  server = file_server({"model.safetensors": payload})
  entry = weights.Weights(
    f"{server.url}/model.safetensors",
    "clip",
    sha256=hashlib.sha256(payload).hexdigest(),
    filename="clip_test.safetensors",
  )
  monkeypatch.setitem(weights.KNOWN, "clip_test", entry)
  net = models.load("clip_test", cache_dir=tmp_path)
  again = models.load("clip_test", cache_dir=tmp_path)
  assert len(server.requests) == 1  # The second load reads the cache.
  assert (tmp_path / "clip" / "clip_test.safetensors").read_bytes() == payload
  jax.tree.map(np.testing.assert_array_equal, net.params, again.params)
  assert net.vocabulary is None  # A single file: the packaged vocabulary.


def test_official_names_and_architectures():
  repos = {
    "clip_vit_b16": "openai/clip-vit-base-patch16",
    "clip_vit_l14": "openai/clip-vit-large-patch14",
    "clip_vit_l14_336": "openai/clip-vit-large-patch14-336",
  }
  for name, repo in repos.items():
    entry = weights.KNOWN[name]
    assert entry.url == f"https://huggingface.co/{repo}/resolve/main/model.safetensors"
    assert entry.filename == f"{name}.safetensors" and entry.kind == "clip"
  # Parameter counts of open_clip's ViT-B-16, ViT-L-14, ViT-L-14-336 (logit_scale included).
  counts = {"vit_b16": 149_620_737, "vit_l14": 427_616_513, "vit_l14_336": 427_944_193}
  for variant, count in counts.items():
    shapes = clip.param_shapes(clip.create(variant))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == count, variant


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_open_clip(fixtures_dir, tokenizer):
  """Every APRIL-GAN prompt for two objects, every class x state, and the edge cases:
  punctuation, digits, accents (NFC and NFD), emoji, CJK, html entities, curly quotes,
  ligatures, full-width forms, control characters, over-long prompts."""
  fixture = json.loads((fixtures_dir / "clip_tokens.json").read_text(encoding="utf-8"))
  prompts = fixture["prompts"]
  assert len(prompts) >= 200
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    ids = tokenizer(prompts)
  expected = np.zeros_like(ids)
  for row, reference in enumerate(fixture["ids"]):
    expected[row, : len(reference)] = reference
  wrong = [prompts[i] for i in np.flatnonzero(np.any(ids != expected, axis=1))]
  assert not wrong, wrong[:5]
  # transformers' CLIPTokenizer (no html unescape, no ftfy) agrees on the plain prompts.
  assert sum(fixture["huggingface_agrees"]) >= 1280


def test_tokenizer_context_truncation_and_vocabulary_files(tmp_path):
  tokenizer = ClipTokenizer.load()
  empty = tokenizer("")
  assert empty.shape == (1, 77) and list(empty[0, :3]) == [49406, 49407, 0]
  with pytest.warns(UserWarning, match="truncated to the context of 77"):
    long = tokenizer(["defect " * 100, "bottle " * 90])
  assert list(long[:, -1]) == [49407, 49407] and np.all(long[:, 1:-1] != 0)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Warned once only.
    tokenizer("bottle " * 90)
  assert tokenizer.decode(tokenizer("A photo of a Damaged  bottle!")[0]) == (
    "a photo of a damaged bottle !"
  )
  short = tokenizer(["a bottle", "a photo of a damaged bottle."], context_length=8)
  assert short.shape == (2, 8) and list(short[0, 3:]) == [49407, 0, 0, 0, 0]
  assert short[1, 7] == 49407  # Truncated, the end token kept.
  # A Hugging Face folder's vocab.json + merges.txt (written here from the packaged file).
  encoder = {t: i for t, i in tokenizer.encoder.items()}
  encoder["<|startoftext|>"] = encoder.pop("<start_of_text>")
  encoder["<|endoftext|>"] = encoder.pop("<end_of_text>")
  (tmp_path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
  merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
  lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
  (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
  folder = ClipTokenizer.load(tmp_path)
  prompts = ["a photo of a damaged bottle.", "très abîmé 🔥", "", "pcb4"]
  np.testing.assert_array_equal(folder(prompts), tokenizer(prompts))
  (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}), encoding="utf-8")
  with pytest.raises(CheckpointError, match="not a CLIP vocabulary"):
    ClipTokenizer.load(tmp_path)


def test_normalize_uses_clip_statistics():
  pixels = np.full((1, 2, 2, 3), 255, np.uint8)
  expected = (1.0 - np.asarray(clip.MEAN)) / np.asarray(clip.STD)
  np.testing.assert_allclose(clip.normalize(pixels)[0, 0, 0], expected, rtol=1e-6)
  assert clip.normalize(pixels).dtype == jnp.float32

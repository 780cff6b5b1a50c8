"""CLIP test fixtures from the reference implementations (open_clip and transformers).

An OPTIONAL tool (needs PyTorch, open_clip_torch and transformers; `maeday_jax` needs
none of them): it writes `tests/fixtures/clip_*`, which prove the Flax port
(`maeday_jax.models.clip`), its weight import and its tokenizer equal to the references.

- `clip_ref_openclip.pth`: a tiny open_clip `CLIP` (quick-GELU, as OpenAI's; the
  architecture of `maeday_jax.models.clip.VARIANTS["test"]`) with random, non-trivial
  weights (seeded NumPy: LayerNorm scales around 1, biases, position tables, a logit
  scale other than the default), saved with `torch.save(model.state_dict())`.
- `clip_ref_hf/` (`config.json`, `model.safetensors`): the same weights in a
  transformers `CLIPModel`, written by `save_pretrained`. The conversion is this tool's
  own; it is checked here by running both models on the same inputs (their outputs agree
  to ~1e-6), so the two files hold one model in two independent layouts.
- `clip_ref_32x32.npz` (the training size) and `clip_ref_40x56.npz` (another size, not
  square): images, open_clip's `encode_image` (before normalisation), every image block's
  output (B, 1 + h * w, width), and (in the first) token ids with `encode_text` and the
  logit scale. At 40 x 56 the reference is a second open_clip model built for that image
  size, its position table resized by open_clip's own `resize_pos_embed` (bicubic,
  antialias), exactly as `open_clip.create_model(..., force_image_size=...)` loads it.
- `clip_tokens.json`: prompts (every APRIL-GAN state x template for two objects, every
  MVTec AD / VisA class with every state, and punctuation, digits, unicode, html,
  control characters, over-long prompts) with open_clip's ids (start and end tokens
  included, padding left out) and whether transformers' `CLIPTokenizer` (built from the
  same vocabulary, written as `vocab.json` + `merges.txt`) agrees.

Deterministic. Regenerate or only check:

    /work/venv-torch/bin/pip install open_clip_torch transformers   # + ftfy, regex
    cd <repo> && PY=/work/venv-torch/bin/python
    $PY tools/references/torch_clip_reference.py --out tests/fixtures
    $PY tools/references/torch_clip_reference.py --out tests/fixtures --check

Written with torch 2.14.1, open_clip_torch 3.3.0, transformers 5.25.0, ftfy 6.3.1,
regex 2026.11.19, numpy 2.4.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import tempfile

import numpy as np
import open_clip
import torch
from open_clip.model import CLIP, resize_pos_embed

# maeday_jax.models.clip.VARIANTS["test"] in open_clip's terms (heads = width / head_width).
VISION = dict(image_size=32, patch_size=8, width=32, layers=3, head_width=16)
TEXT = dict(context_length=77, vocab_size=512, width=32, heads=2, layers=2)
EMBED_DIM = 24
OTHER_SIZE = (40, 56)
BATCH = 2


def build(image_size=None) -> CLIP:
  vision = dict(VISION, image_size=image_size or VISION["image_size"])
  return CLIP(EMBED_DIM, vision, TEXT, quick_gelu=True).eval()


def randomize(model: CLIP, seed: int) -> None:
  """Every parameter non-trivial: matrices ~ N(0, 1/fan_in), LayerNorm scales ~ U(0.5,
  1.5), biases and embeddings ~ N(0, 0.2), logit scale 2.5."""
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name == "logit_scale":
        values = np.full(param.shape, 2.5)
      elif "." in name and name.split(".")[-2].startswith("ln") and name.endswith("weight"):
        values = rng.uniform(0.5, 1.5, param.shape)
      elif param.ndim >= 2 and not name.endswith("embedding") and "embedding." not in name:
        fan_in = int(np.prod(param.shape[1:]))
        if name.endswith("proj") or name == "text_projection":  # x @ proj: (in, out)
          fan_in = param.shape[0]
        values = rng.normal(0.0, 1.0 / math.sqrt(fan_in), param.shape)
      else:
        values = rng.normal(0.0, 0.2 if param.ndim < 2 else 0.5, param.shape)
      param.copy_(torch.from_numpy(values.astype(np.float32)))


def block_outputs(model: CLIP, images: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
  """Every image block's output (batch first) and `encode_image`, from forward hooks."""
  outputs = []
  hooks = [
    block.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach().clone()))
    for block in model.visual.transformer.resblocks
  ]
  with torch.no_grad():
    embeds = model.encode_image(torch.from_numpy(images).permute(0, 3, 1, 2))
  for hook in hooks:
    hook.remove()
  tokens = 1 + (images.shape[1] // 8) * (images.shape[2] // 8)
  blocks = [o if o.shape[1] == tokens else o.transpose(0, 1) for o in outputs]
  return [b.numpy() for b in blocks], embeds.numpy()


def text_ids(rng) -> np.ndarray:
  """Rows of random ids in the small vocabulary: start (510), words, end (511, the
  largest id), zeros; one row fills the context (the end token last)."""
  ids = np.zeros((3, TEXT["context_length"]), np.int64)
  for row, length in enumerate((5, 20, TEXT["context_length"])):
    ids[row, 0] = 510
    ids[row, 1 : length - 1] = rng.integers(1, 510, length - 2)
    ids[row, length - 1] = 511
  return ids


# ------------------------------------------------------------------ Hugging Face copy


def huggingface_state(state: dict) -> dict:
  """open_clip keys -> transformers `CLIPModel` keys (q, k, v split from in_proj)."""
  out = {}

  def tower(prefix_in: str, prefix_out: str, layers: int) -> None:
    for i in range(layers):
      b, e = f"{prefix_in}transformer.resblocks.{i}.", f"{prefix_out}encoder.layers.{i}."
      for part in ("weight", "bias"):
        q, k, v = state[b + f"attn.in_proj_{part}"].chunk(3, dim=0)
        out[e + f"self_attn.q_proj.{part}"] = q
        out[e + f"self_attn.k_proj.{part}"] = k
        out[e + f"self_attn.v_proj.{part}"] = v
        out[e + f"self_attn.out_proj.{part}"] = state[b + f"attn.out_proj.{part}"]
        out[e + f"layer_norm1.{part}"] = state[b + f"ln_1.{part}"]
        out[e + f"layer_norm2.{part}"] = state[b + f"ln_2.{part}"]
        out[e + f"mlp.fc1.{part}"] = state[b + f"mlp.c_fc.{part}"]
        out[e + f"mlp.fc2.{part}"] = state[b + f"mlp.c_proj.{part}"]

  tower("visual.", "vision_model.", VISION["layers"])
  tower("", "text_model.", TEXT["layers"])
  v = "vision_model."
  out[v + "embeddings.class_embedding"] = state["visual.class_embedding"]
  out[v + "embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
  out[v + "embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
  for part in ("weight", "bias"):
    out[v + f"pre_layrnorm.{part}"] = state[f"visual.ln_pre.{part}"]
    out[v + f"post_layernorm.{part}"] = state[f"visual.ln_post.{part}"]
    out[f"text_model.final_layer_norm.{part}"] = state[f"ln_final.{part}"]
  out["visual_projection.weight"] = state["visual.proj"].T
  out["text_model.embeddings.token_embedding.weight"] = state["token_embedding.weight"]
  out["text_model.embeddings.position_embedding.weight"] = state["positional_embedding"]
  out["text_projection.weight"] = state["text_projection"].T
  out["logit_scale"] = state["logit_scale"]
  return {k: v.contiguous() for k, v in out.items()}


def huggingface_model(state: dict):
  from transformers import CLIPConfig, CLIPModel

  common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
  config = CLIPConfig(
    text_config=dict(
      vocab_size=TEXT["vocab_size"],
      hidden_size=TEXT["width"],
      intermediate_size=4 * TEXT["width"],
      num_hidden_layers=TEXT["layers"],
      num_attention_heads=TEXT["heads"],
      max_position_embeddings=TEXT["context_length"],
      bos_token_id=510,
      pad_token_id=1,
      eos_token_id=2,  # transformers' legacy pooling: the argmax of the ids, as open_clip.
      **common,
    ),
    vision_config=dict(
      hidden_size=VISION["width"],
      intermediate_size=4 * VISION["width"],
      num_hidden_layers=VISION["layers"],
      num_attention_heads=VISION["width"] // VISION["head_width"],
      image_size=VISION["image_size"],
      patch_size=VISION["patch_size"],
      **common,
    ),
    projection_dim=EMBED_DIM,
    logit_scale_init_value=2.5,
  )
  model = CLIPModel(config).eval()
  missing, unexpected = model.load_state_dict(huggingface_state(state), strict=False)
  assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
  return model


def _features(out):
  """transformers 5 returns an output object from get_*_features; 4 a tensor."""
  return out if isinstance(out, torch.Tensor) else out.pooler_output


# ------------------------------------------------------------------------- tokenizer

NORMAL = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw"]
NORMAL += ["{} without defect", "{} without damage"]
ABNORMAL = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = [
  "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
  "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.",
  "a photo of my {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
  "a black and white photo of the {}.", "a bright photo of the {}.",
  "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
  "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
  "a close-up photo of the {}.", "a photo of a {}.", "the {} in a photo.",
  "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
  "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.",
  "a photo of the large {}.", "a black and white photo of a {}.", "a dark photo of a {}.",
  "a photo of a cool {}.", "a photo of a small {}.", "there is a {} in the scene.",
  "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
  "this is one {} in the scene.",
]  # fmt: skip
CLASSES = [
  "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal nut", "pill",
  "screw", "tile", "toothbrush", "transistor", "wood", "zipper", "candle", "capsules",
  "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4",
  "pipe_fryum", "magnetic tile", "object",
]  # fmt: skip
EDGE_CASES = [
  "", " ", "   \t\n ", "a", "A PHOTO OF A DAMAGED BOTTLE.", "a  photo\tof\na\r\nbottle",
  "Hello, world!!! What's up?", "it's the cat's toy; they're here, we've gone, I'm ok",
  "you'll see, he'd go", "WE'LL SEE, IT'S", "''s '' 's'", "don't", "rock'n'roll",
  "pcb4 with 3 scratches", "3.14159", "1,000,000 screws", "1st 2nd 3rd 42nd", "0x1F",
  "a-b_c/d\\e|f", "(bracket) [square] {curly} <angle>", "#hashtag @mention $100 %50 ^&*",
  "e-mail: test@example.com", "http://example.com/path?x=1&y=2", "...", "!!!???", "--",
  "café crème", "cafe\u0301 cre\u0300me", "naïve résumé façade", "Ångström", "straße",
  "İstanbul ıi", "ÆØÅ æøå", "Ελληνικά γράμματα", "разбитая бутылка",
  "损坏的瓶子", "壊れたボトル", "손상된 병", "زجاجة مكسورة", "बोतल", "ข้อบกพร่อง",
  "🔥 broken bottle 🍾", "👩\u200d🔬 scientist", "🇩🇪 flag", "✓ ✗ ★ ♥", "1️⃣ keycap",
  "ﬁne ﬂaw ﬀ ﬃ", "ＡＢＣ１２３ ｆｕｌｌ ｗｉｄｔｈ", "ｶﾀｶﾅ halfwidth", "\u3000ideographic space",
  "‘damaged’ “bottle”", "it’s broken", "«guillemets» „low”", "a &amp; b", "&lt;b&gt;bold",
  "&amp;amp;amp; nested", "a < b &amp; c", "Tom &amp Jerry", "&#39;quoted&#39; &#x27;hex&#x27;",
  "&eacute;t&eacute;", "&EACUTE;", "&nbsp;space", "x\u00a0y nbsp", "zero\u200bwidth",
  "soft\u00adhyphen", "a\x00b\x07c", "\x1b[31mred\x1b[0m", "line\u2028sep", "tab\there",
  "C1 \x93quoted\x94 \x85", "emoji at end 😀", "mixed 中文 and english", "x²+y³ ½ ¼ Ⅻ ①",
  "٣ arabic digit", "三 chinese numeral", "ſ long s 'ſ", "<start_of_text>", "<end_of_text>",
  "<|startoftext|>hi<|endoftext|>", "tHiS iS mIxEd CaSe", "under_score_words",
  "a photo of a {}.", "%s %d", "a" * 100, "ab" * 60, "supercalifragilisticexpialidocious",
  "defect " * 100, " ".join(f"word{i}" for i in range(80)),
  "a photo of a damaged bottle with a crack, a scratch, a dent, a hole, a stain, a missing "
  "part, a bent lead, a cut inner insulation, a poke, glue, oil, a fold, a thread, "
  "contamination, liquid, print errors, faulty imprint, a squeeze, a split teeth, "
  "a broken large part and a broken small part on the left side of the image.",
]  # fmt: skip


def prompts() -> list[str]:
  out = []
  for name in ("bottle", "metal nut"):
    for state in NORMAL + ABNORMAL:
      out += [template.format(state.format(name)) for template in TEMPLATES]
  for name in CLASSES:
    out += [state.format(name) for state in NORMAL + ABNORMAL]
  # Around the context: 73 .. 78 words of one token each (75 fit with start and end).
  out += [" ".join(["bottle"] * n) for n in range(73, 79)]
  return out + EDGE_CASES


def write_huggingface_vocabulary(folder: str) -> None:
  """`vocab.json` and `merges.txt` of open_clip's BPE file (the files Hugging Face's
  openai/clip-* repositories hold)."""
  tokenizer = open_clip.tokenizer.SimpleTokenizer()
  encoder = dict(tokenizer.encoder)
  encoder["<|startoftext|>"] = encoder.pop("<start_of_text>")
  encoder["<|endoftext|>"] = encoder.pop("<end_of_text>")
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(encoder, f, ensure_ascii=False)
  path = open_clip.tokenizer.default_bpe()
  with gzip.open(path) as f:
    merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def token_fixture() -> dict:
  from transformers import CLIPTokenizer

  texts = prompts()
  tokenizer = open_clip.tokenizer._tokenizer
  ids = open_clip.tokenizer.tokenize(texts).numpy()
  with tempfile.TemporaryDirectory() as folder:
    write_huggingface_vocabulary(folder)
    hf = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    theirs = hf(texts, max_length=77, truncation=True)["input_ids"]
  rows, agree = [], []
  for text, row, other in zip(texts, ids, theirs, strict=True):
    length = min(len(tokenizer.encode(text)) + 2, 77)  # Start, the prompt, end.
    rows.append([int(i) for i in row[:length]])
    agree.append([int(i) for i in other] == rows[-1])
  return {"prompts": texts, "ids": rows, "huggingface_agrees": agree}


# ---------------------------------------------------------------------------- writing


def _compare(path: str, arrays: dict, check: bool) -> float:
  if not check:
    np.savez_compressed(path, **arrays)
    return 0.0
  worst = 0.0
  with np.load(path) as stored:
    for name, value in arrays.items():
      diff = float(np.max(np.abs(stored[name].astype(np.float64) - value)))
      worst = max(worst, diff)
      np.testing.assert_allclose(stored[name], value, rtol=0, atol=1e-5, err_msg=name)
  return worst


def write(out_dir: str, check: bool) -> None:
  torch.manual_seed(0)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  model = build()
  randomize(model, seed=1234)
  state = {k: v.detach().clone() for k, v in model.state_dict().items()}
  rng = np.random.default_rng(99)
  ids = text_ids(rng)
  with torch.no_grad():
    text = model.encode_text(torch.from_numpy(ids)).numpy()
  hf = huggingface_model(state)
  if not check:
    torch.save(state, os.path.join(out_dir, "clip_ref_openclip.pth"))
    folder = os.path.join(out_dir, "clip_ref_hf")
    hf.save_pretrained(folder, safe_serialization=True)
    os.chmod(os.path.join(folder, "model.safetensors"), 0o644)
  worst, cross = 0.0, 0.0
  for height, width in ((32, 32), OTHER_SIZE):
    images = rng.normal(0.0, 1.0, (BATCH, height, width, 3)).astype(np.float32)
    reference = model
    if (height, width) != (32, 32):
      reference = build((height, width))
      resized = dict(state)
      resize_pos_embed(resized, reference)  # open_clip's own resizing (bicubic, antialias).
      reference.load_state_dict(resized)
    blocks, embeds = block_outputs(reference, images)
    arrays = {"images": images, "image_embeds": embeds}
    arrays.update({f"block_{i}": b for i, b in enumerate(blocks)})
    if (height, width) == (32, 32):
      arrays.update(ids=ids.astype(np.int32), text_embeds=text)
      arrays["logit_scale"] = np.float32(model.logit_scale.item())
      with torch.no_grad():
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2)
        hf_image = _features(hf.get_image_features(pixel_values=pixels)).numpy()
        hf_text = _features(hf.get_text_features(input_ids=torch.from_numpy(ids))).numpy()
      cross = max(float(np.max(np.abs(hf_image - embeds))), float(np.max(np.abs(hf_text - text))))
      assert cross < 1e-5, cross
    path = os.path.join(out_dir, f"clip_ref_{height}x{width}.npz")
    worst = max(worst, _compare(path, arrays, check))
  tokens = token_fixture()
  path = os.path.join(out_dir, "clip_tokens.json")
  if check:
    with open(path, encoding="utf-8") as f:
      assert json.load(f) == tokens, "clip_tokens.json differs"
  else:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(tokens, f, ensure_ascii=False, separators=(",", ":"))
  agree = sum(tokens["huggingface_agrees"])
  print(
    f"{'checked' if check else 'wrote'} CLIP fixtures in {out_dir}: max diff {worst:.2e}, "
    f"transformers vs open_clip {cross:.2e}; {len(tokens['prompts'])} prompts, "
    f"transformers' tokenizer agrees on {agree}"
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures")
  parser.add_argument("--check", action="store_true", help="compare, write nothing")
  args = parser.parse_args()
  write(args.out, args.check)


if __name__ == "__main__":
  main()

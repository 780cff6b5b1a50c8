"""Independent PyTorch reference of the official DINOv2 ViT, and its test-fixture writer.

An OPTIONAL tool (needs PyTorch; `maeday_jax` does not): it writes the small random-weight
checkpoints and input/output arrays in `tests/fixtures/dinov2_*` that prove the Flax port
(`maeday_jax.models.dinov2`) and its weight import equal to the official model.

The model follows facebookresearch/dinov2 `vision_transformer.py` (`DinoVisionTransformer`)
and its layers (`PatchEmbed`, `Attention`, `LayerScale`, `Mlp`, `SwiGLUFFNFused`,
`NestedTensorBlock`) written out in plain PyTorch, so the state-dict keys are exactly the
official ones (`cls_token`, `pos_embed`, `register_tokens`, `mask_token`,
`patch_embed.proj.*`, `blocks.{i}.norm1.*`, `blocks.{i}.attn.qkv.*`, `blocks.{i}.ls1.gamma`,
`blocks.{i}.mlp.fc1.*` or `blocks.{i}.mlp.w12.*`, `norm.*`). Position embeddings are
resized for other input sizes exactly as the official `interpolate_pos_encoding` does:
`torch.nn.functional.interpolate(..., mode="bicubic")` with the scale factor
`(grid + offset) / M` and no antialias for the original models (offset 0.1), the output
size with antialias for the `_reg` models (offset 0).

Random weights are drawn with non-trivial layer scales, position tables and biases, so
every parameter matters. Regenerate (deterministic) or only check:

    python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch==2.13.0 numpy
    cd <repo> && PY=/work/venv-torch/bin/python
    $PY tools/references/torch_dinov2_reference.py --out tests/fixtures
    $PY tools/references/torch_dinov2_reference.py --out tests/fixtures --check
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# The fixtures' architectures: a 4 x 4 position grid (img_size 56 at patch 14), three
# blocks; "a" as the original models (MLP, offset 0.1, no antialias), "b" as the `_reg`
# models with a SwiGLU MLP as ViT-g uses (4 registers, offset 0, antialias).
ARCHS = {
  "a": dict(
    img_size=56,
    patch_size=14,
    embed_dim=48,
    depth=3,
    num_heads=3,
    ffn="mlp",
    num_register_tokens=0,
    interpolate_offset=0.1,
    interpolate_antialias=False,
  ),
  "b": dict(
    img_size=56,
    patch_size=14,
    embed_dim=48,
    depth=3,
    num_heads=3,
    ffn="swiglu",
    num_register_tokens=4,
    interpolate_offset=0.0,
    interpolate_antialias=True,
  ),
}
# Input sizes (height, width): the training size, a non-square one (both axes resized,
# one shrunk and one grown), and a larger square one.
SIZES = ((56, 56), (42, 84), (112, 112))
BATCH = 2


class LayerScale(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    return x * self.gamma


class Attention(nn.Module):
  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUFFN(nn.Module):
  """The official `SwiGLUFFNFused`: hidden width 2/3 of the MLP's, rounded up to 8."""

  def __init__(self, dim, hidden):
    super().__init__()
    hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    self.w12 = nn.Linear(dim, 2 * hidden)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class Block(nn.Module):
  def __init__(self, dim, num_heads, ffn):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.ls1 = LayerScale(dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = (Mlp if ffn == "mlp" else SwiGLUFFN)(dim, 4 * dim)
    self.ls2 = LayerScale(dim)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
  def __init__(self, arch: dict):
    super().__init__()
    dim, patch = arch["embed_dim"], arch["patch_size"]
    self.patch_size = patch
    self.num_register_tokens = arch["num_register_tokens"]
    self.interpolate_offset = arch["interpolate_offset"]
    self.interpolate_antialias = arch["interpolate_antialias"]
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
    grid = arch["img_size"] // patch
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
    self.mask_token = nn.Parameter(torch.zeros(1, dim))
    if self.num_register_tokens:
      self.register_tokens = nn.Parameter(torch.zeros(1, self.num_register_tokens, dim))
    self.blocks = nn.ModuleList(
      [Block(dim, arch["num_heads"], arch["ffn"]) for _ in range(arch["depth"])]
    )
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def interpolate_pos_encoding(self, x, w, h):
    """The official method, argument names and all (`w`, `h` are the image's height and
    width, in that order)."""
    npatch = x.shape[1] - 1
    n = self.pos_embed.shape[1] - 1
    if npatch == n and w == h:
      return self.pos_embed
    pos_embed = self.pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0, h0 = w // self.patch_size, h // self.patch_size
    m = int(math.sqrt(n))
    kwargs = {}
    if self.interpolate_offset:
      sx = float(w0 + self.interpolate_offset) / m
      sy = float(h0 + self.interpolate_offset) / m
      kwargs["scale_factor"] = (sx, sy)
    else:
      kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
      patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
      mode="bicubic",
      antialias=self.interpolate_antialias,
      **kwargs,
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

  def prepare_tokens(self, x):
    _, _, w, h = x.shape
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + self.interpolate_pos_encoding(x, w, h)
    if self.num_register_tokens:
      registers = self.register_tokens.expand(x.shape[0], -1, -1)
      x = torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)
    return x

  def forward_blocks(self, x):
    """The output of every block, (B, 1 + registers + patches, C) each."""
    x = self.prepare_tokens(x)
    outputs = []
    for block in self.blocks:
      x = block(x)
      outputs.append(x)
    return outputs


def build(arch: dict, seed: int) -> DinoVisionTransformer:
  """The reference with random weights drawn from a fixed NumPy seed (every parameter
  non-trivial: layer scales around 0.5, position tables, biases)."""
  model = DinoVisionTransformer(arch).eval()
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("gamma"):
        values = rng.uniform(0.2, 0.8, param.shape)
      elif name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
        values = rng.uniform(0.5, 1.5, param.shape)
      else:
        fan_in = param.shape[-1] if param.ndim > 1 else 1
        if param.ndim == 4:
          fan_in = int(np.prod(param.shape[1:]))
        values = rng.normal(0.0, 1.0 / math.sqrt(fan_in) if param.ndim > 1 else 0.2, param.shape)
      param.copy_(torch.from_numpy(values.astype(np.float32)))
  return model


def _outputs(model, images: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    blocks = model.forward_blocks(torch.from_numpy(images).permute(0, 3, 1, 2))
    normed = model.norm(blocks[-1])
  out = {f"block_{i}": b.numpy() for i, b in enumerate(blocks)}
  out["normed"] = normed.numpy()
  return out


def write(out_dir: str, check: bool) -> None:
  torch.manual_seed(0)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  worst = 0.0
  for key, arch in ARCHS.items():
    model = build(arch, seed=100 + ord(key))
    path = os.path.join(out_dir, f"dinov2_ref_{key}.pth")
    if not check:
      torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
    rng = np.random.default_rng(200 + ord(key))
    for height, width in SIZES:
      images = rng.normal(0.0, 1.0, (BATCH, height, width, 3)).astype(np.float32)
      outputs = _outputs(model, images)
      io_path = os.path.join(out_dir, f"dinov2_ref_{key}_{height}x{width}.npz")
      if check:
        with np.load(io_path) as stored:
          for name, value in outputs.items():
            diff = float(np.max(np.abs(stored[name] - value)))
            worst = max(worst, diff)
            np.testing.assert_allclose(stored[name], value, rtol=0, atol=1e-5)
      else:
        np.savez_compressed(io_path, images=images, **outputs)
  print(("checked" if check else "wrote") + f" DINOv2 fixtures in {out_dir} (max diff {worst:.2e})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="tests/fixtures")
  parser.add_argument("--check", action="store_true", help="compare, write nothing")
  args = parser.parse_args()
  write(args.out, args.check)


if __name__ == "__main__":
  main()

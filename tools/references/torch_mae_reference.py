"""Independent PyTorch reference of the official MAE model, and the test-fixture writer.

This is an OPTIONAL tool: it needs PyTorch, timm and safetensors, none of which
`maeday_jax` itself depends on. It exists for two jobs only:

1. Regenerating the small random-weight checkpoints and input/output arrays in
   `tests/fixtures/`, which the JAX test suite uses to prove that the Flax port and the
   checkpoint loaders reproduce the official architecture (the suite can download
   nothing, so it cannot use the real pre-trained weights).
2. Side-by-side benchmarking/numerical comparison of the Flax port against PyTorch
   (import `build_reference` and `reconstruct` from here).

The model follows facebookresearch/mae `models_mae.py` (`MaskedAutoencoderViT`) with
timm's `PatchEmbed` and `Block`, so the state-dict key names are exactly the official
ones (`cls_token`, `pos_embed`, `patch_embed.proj.weight`, `blocks.{i}.attn.qkv.weight`,
..., `decoder_pred.bias`). Weights are written in two formats:

* official: `torch.save({'model': state_dict}, path)` (a PyTorch zip archive), and
* Hugging Face `ViTMAEForPreTraining` safetensors (`vit.embeddings.*`,
  `vit.encoder.layer.{i}.attention.attention.{query,key,value}.*`, ..., `decoder.*`).

Regenerate every fixture (deterministic: weights, images and noise come from fixed numpy
seeds; PyTorch runs single-threaded with deterministic algorithms), then self-check:

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.14.1 torchvision==0.29.1 timm numpy safetensors
    /work/venv-torch/bin/python tools/references/torch_mae_reference.py --out tests/fixtures

(timm 1.0.x imports torchvision at import time, hence torchvision; the committed fixtures
were written with torch 2.14.1, torchvision 0.29.1, timm 1.0.31, numpy 2.4.6.)

Only re-check existing fixtures (writes nothing):

    /work/venv-torch/bin/python tools/references/torch_mae_reference.py --out tests/fixtures --check
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import numpy as np
import safetensors.torch
import torch
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn

# ----------------------------------------------------------------------------------------
# Architectures of the committed fixtures.
# ----------------------------------------------------------------------------------------

# Arch A: 4x4 patch grid, two heads, written in the official .pth format only.
ARCH_A = dict(
  img_size=32,
  patch_size=8,
  embed_dim=128,
  depth=2,
  num_heads=2,
  decoder_embed_dim=64,
  decoder_depth=1,
  decoder_num_heads=2,
)
# Arch B: odd 3x3 grid (L=9, so int(L * 0.25) = 2 truncates), patch 14 like ViT-H,
# single-head attention, two decoder blocks; written as HF safetensors and as .pth.
ARCH_B = dict(
  img_size=42,
  patch_size=14,
  embed_dim=64,
  depth=3,
  num_heads=1,
  decoder_embed_dim=32,
  decoder_depth=2,
  decoder_num_heads=1,
)
# Tiny encoder-only file (like the `mae_pretrain_*` releases: no decoder, no mask_token);
# the decoder arguments only exist because the model class needs them.
ARCH_ENC = dict(
  img_size=16,
  patch_size=8,
  embed_dim=32,
  depth=1,
  num_heads=2,
  decoder_embed_dim=16,
  decoder_depth=1,
  decoder_num_heads=1,
)
ARCH_KEYS = tuple(ARCH_A)

MASK_RATIO = 0.75
BATCH = 2
NUM_MASKS = 4

# ----------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embeddings (official util/pos_embed.py formula).
# ----------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """Returns (M, embed_dim) = [sin(pos * omega), cos(pos * omega)] for the M positions."""
  assert embed_dim % 2 == 0
  # The original release computed omega with `np.float` (float64); float64 here and one
  # cast to float32 at the end gives the most accurate float32 table.
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega  # (D/2,)
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False):
  """Returns ([1 +] grid_size**2, embed_dim) float64, rows in row-major patch order.

  As in the official code, `np.meshgrid(grid_w, grid_h)` puts the W (column) coordinate
  in grid[0], and grid[0] feeds the FIRST half of the channels (named `emb_h` there).
  So channels [0, D/2) encode the column index and [D/2, D) the row index.
  """
  assert embed_dim % 4 == 0
  grid_h = np.arange(grid_size, dtype=np.float64)
  grid_w = np.arange(grid_size, dtype=np.float64)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # here w goes first
  grid = grid.reshape(2, 1, grid_size, grid_size)
  emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
  emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  pos_embed = np.concatenate([emb_h, emb_w], axis=1)
  if cls_token:
    pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
  return pos_embed


# ----------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------


class MaskedAutoencoderViT(nn.Module):
  """Masked Autoencoder with a ViT backbone, as in facebookresearch/mae `models_mae.py`.

  Differences from the official class are additive only: `random_masking` and
  `forward*` accept an explicit `noise` (B, L) so that masks are reproducible, and
  `mask_ratio` is an argument of `forward` (as in the official code).
  """

  def __init__(
    self,
    img_size: int = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    embed_dim: int = 1024,
    depth: int = 24,
    num_heads: int = 16,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    decoder_num_heads: int = 16,
    mlp_ratio: float = 4.0,
    norm_pix_loss: bool = False,
    fused_attn: bool = False,
  ):
    super().__init__()
    # All official MAE factory functions pass eps=1e-6 (nn.LayerNorm default is 1e-5).
    norm_layer = partial(nn.LayerNorm, eps=1e-6)
    self.in_chans = in_chans

    # MAE encoder.
    self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
    num_patches = self.patch_embed.num_patches
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(
      torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False
    )  # fixed sin-cos embedding
    # timm's Block default act_layer is nn.GELU (exact erf form), as in the release.
    self.blocks = nn.ModuleList(
      [
        Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        for _ in range(depth)
      ]
    )
    self.norm = norm_layer(embed_dim)

    # MAE decoder.
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(
      torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
    )  # fixed sin-cos embedding
    self.decoder_blocks = nn.ModuleList(
      [
        Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
        for _ in range(decoder_depth)
      ]
    )
    self.decoder_norm = norm_layer(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

    self.norm_pix_loss = norm_pix_loss

    # Recent timm uses F.scaled_dot_product_attention by default; the explicit
    # softmax(q k^T / sqrt(d)) v path is what the release ran (timm 0.3.2) and is
    # bit-for-bit deterministic on CPU, so use it unless asked otherwise (benchmarks).
    for blk in list(self.blocks) + list(self.decoder_blocks):
      blk.attn.fused_attn = fused_attn

    self._init_pos_embed()

  def _init_pos_embed(self):
    grid = int(self.patch_embed.num_patches**0.5)
    pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid, cls_token=True)
    self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
    dec = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True)
    self.decoder_pos_embed.data.copy_(torch.from_numpy(dec).float().unsqueeze(0))

  @property
  def patch_size(self) -> int:
    return self.patch_embed.patch_size[0]

  def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, L, p*p*3), inner order (p_row, p_col, channel)."""
    p = self.patch_size
    assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
    h = w = imgs.shape[2] // p
    x = imgs.reshape(imgs.shape[0], 3, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(imgs.shape[0], h * w, p**2 * 3)

  def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
    """(N, L, p*p*3) -> (N, 3, H, W); inverse of `patchify`."""
    p = self.patch_size
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(x.shape[0], h, w, p, p, 3)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], 3, h * p, h * p)

  def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random masking by argsort of noise (official algorithm).

    x: (N, L, D); noise: (N, L) in [0, 1), drawn with torch.rand when None.
    Returns x_masked (N, len_keep, D), mask (N, L) with 0 = keep / 1 = remove, and
    ids_restore (N, L).
    """
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
      noise = torch.rand(n, length, device=x.device)
    # Ascending sort: the smallest noise values are kept, the largest removed.
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length], device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle
    return x_masked, mask, ids_restore

  def forward_encoder(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    x = self.patch_embed(x)
    x = x + self.pos_embed[:, 1:, :]  # pos embed w/o cls token
    x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
    cls_token = self.cls_token + self.pos_embed[:, :1, :]
    x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.norm(x)
    return x, mask, ids_restore

  def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    x = self.decoder_embed(x)
    # Append mask tokens after the visible tokens, then undo the shuffle.
    mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)  # prepend cls token
    x = x + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    x = self.decoder_norm(x)
    x = self.decoder_pred(x)
    return x[:, 1:, :]  # drop cls token

  def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean = target.mean(dim=-1, keepdim=True)
      var = target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)  # (N, L) mean loss per patch
    return (loss * mask).sum() / mask.sum()  # mean loss on removed patches

  def forward(
    self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
  ):
    latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
    pred = self.forward_decoder(latent, ids_restore)  # (N, L, p*p*3)
    loss = self.forward_loss(imgs, pred, mask)
    return loss, pred, mask


# ----------------------------------------------------------------------------------------
# Construction, random weights, state-dict names.
# ----------------------------------------------------------------------------------------


def build_reference(
  seed: int | None = None, fused_attn: bool = False, **arch
) -> MaskedAutoencoderViT:
  """Builds the reference model in eval mode.

  With `seed`, every trainable tensor gets non-trivial random values (see
  `randomize_weights`); without it the model holds zeros (plus the sin-cos tables) and is
  meant to be filled with `load_state_dict`.
  """
  model = MaskedAutoencoderViT(fused_attn=fused_attn, **arch)
  if seed is not None:
    randomize_weights(model, seed)
  return model.eval()


def randomize_weights(model: MaskedAutoencoderViT, seed: int) -> None:
  """Fills all trainable weights from a numpy PCG64 stream (stable across versions).

  Scales keep activations of order one so the test outputs are informative: Linear/Conv
  weights ~ N(0, 1/fan_in), biases ~ U(-0.1, 0.1), LayerNorm scale ~ 1 + U(-0.2, 0.2)
  and shift ~ U(-0.1, 0.1) (so a swapped or dropped scale/shift shows), cls/mask tokens
  ~ N(0, 0.5^2). pos_embed/decoder_pos_embed keep the fixed sin-cos values.
  """
  rng = np.random.default_rng(seed)

  def fill(param: torch.Tensor, values: np.ndarray) -> None:
    param.data.copy_(torch.from_numpy(values.astype(np.float32)).reshape(param.shape))

  # named_modules is deterministic (registration order), so the stream is too.
  for _, module in model.named_modules():
    if isinstance(module, nn.Linear | nn.Conv2d):
      w = module.weight
      fan_in = int(np.prod(w.shape[1:]))
      fill(w, rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=w.shape))
      fill(module.bias, rng.uniform(-0.1, 0.1, size=module.bias.shape))
    elif isinstance(module, nn.LayerNorm):
      fill(module.weight, 1.0 + rng.uniform(-0.2, 0.2, size=module.weight.shape))
      fill(module.bias, rng.uniform(-0.1, 0.1, size=module.bias.shape))
  fill(model.cls_token, rng.normal(0.0, 0.5, size=model.cls_token.shape))
  fill(model.mask_token, rng.normal(0.0, 0.5, size=model.mask_token.shape))


_BLOCK_PARAMS = (
  "norm1.weight",
  "norm1.bias",
  "attn.qkv.weight",
  "attn.qkv.bias",
  "attn.proj.weight",
  "attn.proj.bias",
  "norm2.weight",
  "norm2.bias",
  "mlp.fc1.weight",
  "mlp.fc1.bias",
  "mlp.fc2.weight",
  "mlp.fc2.bias",
)


def official_keys(depth: int, decoder_depth: int, with_decoder: bool = True) -> list[str]:
  """The exact key list of an official MAE state dict (spec section 3)."""
  keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
  keys += [f"blocks.{i}.{k}" for i in range(depth) for k in _BLOCK_PARAMS]
  keys += ["norm.weight", "norm.bias"]
  if with_decoder:
    keys += ["decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed"]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in _BLOCK_PARAMS]
    keys += ["decoder_norm.weight", "decoder_norm.bias"]
    keys += ["decoder_pred.weight", "decoder_pred.bias"]
  return keys


def official_state_dict(model: MaskedAutoencoderViT, with_decoder: bool = True):
  """model.state_dict(), checked to hold exactly the official keys.

  The OrderedDict itself (with its `_metadata`) is kept, because that is what the release
  pickled and what a safe loader has to cope with.
  """
  sd = model.state_dict()
  n_dec = len(model.decoder_blocks)
  if not with_decoder:
    for k in [k for k in sd if k.startswith("decoder_") or k == "mask_token"]:
      del sd[k]
  expected = official_keys(len(model.blocks), n_dec, with_decoder)
  if set(sd) != set(expected):
    raise AssertionError(f"state-dict keys differ from official: {sorted(set(sd) ^ set(expected))}")
  return sd


# Per-layer renames official -> HF ViTMAE (attention qkv handled separately).
_HF_LAYER_NAMES = {
  "norm1": "layernorm_before",
  "norm2": "layernorm_after",
  "attn.proj": "attention.output.dense",
  "mlp.fc1": "intermediate.dense",
  "mlp.fc2": "output.dense",
}
_HF_TOP_NAMES = {
  "cls_token": "vit.embeddings.cls_token",
  "pos_embed": "vit.embeddings.position_embeddings",
  "patch_embed.proj.weight": "vit.embeddings.patch_embeddings.projection.weight",
  "patch_embed.proj.bias": "vit.embeddings.patch_embeddings.projection.bias",
  "norm.weight": "vit.layernorm.weight",
  "norm.bias": "vit.layernorm.bias",
  "decoder_embed.weight": "decoder.decoder_embed.weight",
  "decoder_embed.bias": "decoder.decoder_embed.bias",
  "mask_token": "decoder.mask_token",
  "decoder_pos_embed": "decoder.decoder_pos_embed",
  "decoder_norm.weight": "decoder.decoder_norm.weight",
  "decoder_norm.bias": "decoder.decoder_norm.bias",
  "decoder_pred.weight": "decoder.decoder_pred.weight",
  "decoder_pred.bias": "decoder.decoder_pred.bias",
}


def to_hf_state_dict(sd) -> dict[str, torch.Tensor]:
  """Official MAE names -> HF `ViTMAEForPreTraining` names, splitting qkv into q, k, v."""
  out = {}
  for key, value in sd.items():
    if key in _HF_TOP_NAMES:
      out[_HF_TOP_NAMES[key]] = value
      continue
    stack, idx, rest = key.split(".", 2)
    prefix = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}[stack]
    prefix = f"{prefix}.{idx}"
    if rest.startswith("attn.qkv."):
      # timm reshapes the qkv output to (3, heads, head_dim): rows [0,D) are q, then k, v.
      suffix = rest.rsplit(".", 1)[1]
      for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
        out[f"{prefix}.attention.attention.{name}.{suffix}"] = chunk
      continue
    module, suffix = rest.rsplit(".", 1)
    out[f"{prefix}.{_HF_LAYER_NAMES[module]}.{suffix}"] = value
  # safetensors wants contiguous tensors that own their memory (the q/k/v chunks are views).
  return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Inverse of `to_hf_state_dict` (used by the self-check to rebuild the model)."""
  top = {v: k for k, v in _HF_TOP_NAMES.items()}
  layer = {v: k for k, v in _HF_LAYER_NAMES.items()}
  out, qkv = {}, {}
  for key, value in hf.items():
    if key in top:
      out[top[key]] = value
      continue
    if key.startswith("vit.encoder.layer."):
      stack, rest = "blocks", key[len("vit.encoder.layer.") :]
    elif key.startswith("decoder.decoder_layers."):
      stack, rest = "decoder_blocks", key[len("decoder.decoder_layers.") :]
    else:
      raise KeyError(f"unexpected HF key {key}")
    idx, rest = rest.split(".", 1)
    module, suffix = rest.rsplit(".", 1)
    if module.startswith("attention.attention."):
      qkv.setdefault((stack, idx, suffix), {})[module.rsplit(".", 1)[1]] = value
      continue
    out[f"{stack}.{idx}.{layer[module]}.{suffix}"] = value
  for (stack, idx, suffix), parts in qkv.items():
    out[f"{stack}.{idx}.attn.qkv.{suffix}"] = torch.cat(
      [parts["query"], parts["key"], parts["value"]], dim=0
    )
  return out


# ----------------------------------------------------------------------------------------
# Writers and readers.
# ----------------------------------------------------------------------------------------


def save_official(model: MaskedAutoencoderViT, path: str, with_decoder: bool = True) -> None:
  """Writes `{'model': state_dict}` with torch.save (zip archive), like the release."""
  torch.save({"model": official_state_dict(model, with_decoder)}, path)


def save_hf_safetensors(model: MaskedAutoencoderViT, path: str) -> None:
  """Writes the HF ViTMAEForPreTraining safetensors layout."""
  hf = to_hf_state_dict(official_state_dict(model))
  # `format: pt` is the metadata transformers' save_pretrained writes.
  safetensors.torch.save_file(hf, path, metadata={"format": "pt"})


def load_official(path: str, **arch) -> MaskedAutoencoderViT:
  """Rebuilds the reference model from an official-format file (weights_only=True)."""
  ckpt = torch.load(path, map_location="cpu", weights_only=True)
  model = build_reference(**arch)
  model.load_state_dict(ckpt["model"], strict=True)
  return model


def load_hf_safetensors(path: str, **arch) -> MaskedAutoencoderViT:
  """Rebuilds the reference model from HF-named safetensors."""
  model = build_reference(**arch)
  model.load_state_dict(from_hf_state_dict(safetensors.torch.load_file(path)), strict=True)
  return model


# ----------------------------------------------------------------------------------------
# Inference helpers.
# ----------------------------------------------------------------------------------------


def _as_tensor(x, device, dtype) -> torch.Tensor:
  if isinstance(x, torch.Tensor):
    return x.to(device=device, dtype=dtype)
  return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


@torch.inference_mode()
def reconstruct(model: MaskedAutoencoderViT, images_nhwc, noise, mask_ratio: float = MASK_RATIO):
  """MAE predictions for NHWC images (already normalised) and explicit masking noise.

  images_nhwc: (B, H, W, 3) numpy array or tensor.
  noise: (B, L) -> one mask per image; or (B, M, L) -> M masks per image (each image
    repeated M times, pairs ordered image-major).
  Returns numpy (pred, mask): pred (B, [M,] L, p*p*3) in patchify order and mask
  (B, [M,] L) with 1 = removed patch.
  """
  param = next(model.parameters())
  imgs = _as_tensor(images_nhwc, param.device, param.dtype).permute(0, 3, 1, 2)
  noise = _as_tensor(noise, param.device, torch.float32)
  multi = noise.ndim == 3
  if multi:
    b, m, length = noise.shape
    imgs = imgs.repeat_interleave(m, dim=0)
    noise = noise.reshape(b * m, length)
  latent, mask, ids_restore = model.forward_encoder(imgs, mask_ratio, noise)
  pred = model.forward_decoder(latent, ids_restore)
  pred, mask = pred.float().cpu().numpy(), mask.float().cpu().numpy()
  if multi:
    pred = pred.reshape(b, m, *pred.shape[1:])
    mask = mask.reshape(b, m, *mask.shape[1:])
  return pred, mask


@torch.inference_mode()
def _io_arrays(model: MaskedAutoencoderViT, images: np.ndarray, noise: np.ndarray) -> dict:
  """pred/latent/mask/ids_restore of a single batched call (what the npz stores)."""
  imgs = torch.from_numpy(images).permute(0, 3, 1, 2)
  latent, mask, ids_restore = model.forward_encoder(imgs, MASK_RATIO, torch.from_numpy(noise))
  pred = model.forward_decoder(latent, ids_restore)
  return {
    "pred": pred.numpy(),
    "latent": latent.numpy(),
    "mask": mask.numpy(),
    "ids_restore": ids_restore.numpy().astype(np.int32),
    "target": model.patchify(imgs).numpy(),
  }


def make_io(model: MaskedAutoencoderViT, arch: dict, seed: int) -> dict[str, np.ndarray]:
  """Inputs (images, noise) from `seed` and the model's outputs, as float32 arrays."""
  rng = np.random.default_rng(seed)
  size, p = arch["img_size"], arch["patch_size"]
  length = (size // p) ** 2
  images = rng.normal(0.0, 1.0, size=(BATCH, size, size, 3)).astype(np.float32)
  noise = rng.random((BATCH, length), dtype=np.float32)
  noise_multi = rng.random((BATCH, NUM_MASKS, length), dtype=np.float32)
  io = {"images": images, "noise": noise, "mask_ratio": np.float32(MASK_RATIO)}
  io.update(_io_arrays(model, images, noise))
  io["noise_multi"] = noise_multi
  io["pred_multi"], io["mask_multi"] = reconstruct(model, images, noise_multi)
  io["len_keep"] = np.int32(int(length * (1 - MASK_RATIO)))
  for k in ARCH_KEYS:
    io[k] = np.int32(arch[k])
  return io


# ----------------------------------------------------------------------------------------
# Fixture generation and self-check.
# ----------------------------------------------------------------------------------------

# name -> (arch, weight seed, io seed, formats)
FIXTURES = {
  "mae_ref_a": (ARCH_A, 1, 101, ("pth",)),
  "mae_ref_b": (ARCH_B, 2, 102, ("pth", "safetensors")),
}
ENCODER_ONLY = ("mae_ref_encoder_only", ARCH_ENC, 3)


def _set_deterministic() -> None:
  torch.manual_seed(0)  # nothing should draw from torch's RNG, but pin it regardless
  torch.set_num_threads(1)  # fixed reduction order in the CPU kernels
  torch.use_deterministic_algorithms(True)


def generate(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  for name, (arch, wseed, ioseed, formats) in FIXTURES.items():
    model = build_reference(seed=wseed, **arch)
    if "pth" in formats:
      save_official(model, os.path.join(out_dir, f"{name}.pth"))
    if "safetensors" in formats:
      save_hf_safetensors(model, os.path.join(out_dir, f"{name}.safetensors"))
    np.savez_compressed(os.path.join(out_dir, f"{name}_io.npz"), **make_io(model, arch, ioseed))
  name, arch, wseed = ENCODER_ONLY
  model = build_reference(seed=wseed, **arch)
  save_official(model, os.path.join(out_dir, f"{name}.pth"), with_decoder=False)


def _assert_equal(name: str, got: np.ndarray, want: np.ndarray) -> None:
  if got.shape != want.shape or not np.array_equal(got, want):
    diff = np.max(np.abs(got - want)) if got.shape == want.shape else "shape"
    raise AssertionError(f"{name}: mismatch ({got.shape} vs {want.shape}, max diff {diff})")


def check(out_dir: str) -> None:
  """Reloads every fixture from disk and recomputes the stored outputs."""
  for name, (arch, _, _, formats) in FIXTURES.items():
    io = dict(np.load(os.path.join(out_dir, f"{name}_io.npz")))
    for k in ARCH_KEYS:
      assert int(io[k]) == arch[k], (name, k)
    expected = official_keys(arch["depth"], arch["decoder_depth"])
    models = {}
    if "pth" in formats:
      path = os.path.join(out_dir, f"{name}.pth")
      ckpt = torch.load(path, map_location="cpu", weights_only=True)
      assert list(ckpt) == ["model"], list(ckpt)
      # Order is the module registration order (direct parameters first), as in the release.
      assert set(ckpt["model"]) == set(expected), "official key names"
      assert all(v.dtype == torch.float32 for v in ckpt["model"].values())
      models["pth"] = load_official(path, **arch)
    if "safetensors" in formats:
      path = os.path.join(out_dir, f"{name}.safetensors")
      hf = safetensors.torch.load_file(path)
      assert set(hf) == set(to_hf_state_dict(dict.fromkeys(expected, torch.zeros(3)))), "HF names"
      models["safetensors"] = load_hf_safetensors(path, **arch)
    if len(models) == 2:  # both formats must hold identical weights
      sd_a, sd_b = models["pth"].state_dict(), models["safetensors"].state_dict()
      for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k

    for fmt, model in models.items():
      got = _io_arrays(model, io["images"], io["noise"])
      for k, v in got.items():
        _assert_equal(f"{name}.{fmt}.{k}", v, io[k])
      pred_multi, mask_multi = reconstruct(model, io["images"], io["noise_multi"])
      _assert_equal(f"{name}.{fmt}.pred_multi", pred_multi, io["pred_multi"])
      _assert_equal(f"{name}.{fmt}.mask_multi", mask_multi, io["mask_multi"])

      # One (image, mask) pair computed on its own must match the batched pred_multi.
      single, single_mask = reconstruct(model, io["images"][:1], io["noise_multi"][:1, 0])
      err = float(np.max(np.abs(single[0] - io["pred_multi"][0, 0])))
      assert err <= 1e-5, (name, fmt, err)
      _assert_equal(f"{name}.{fmt}.single_mask", single_mask[0], io["mask_multi"][0, 0])

      # Sanity of the stored mask: exactly L - len_keep removed patches per row.
      length = io["noise"].shape[1]
      assert np.all(io["mask"].sum(1) == length - int(io["len_keep"]))

      # Float32 rounding scale, to help pick tolerances for the JAX comparison.
      model64 = build_reference(**arch).double()
      model64.load_state_dict(model.state_dict())
      pred64, _ = reconstruct(model64, io["images"].astype(np.float64), io["noise"])
      err64 = float(np.max(np.abs(pred64 - io["pred"])))
      print(
        f"ok {name}.{fmt}: pred {io['pred'].shape} std {io['pred'].std():.3f}; "
        f"single-vs-batched max diff {err:.2e}; float32-vs-float64 max diff {err64:.2e}"
      )

  name, arch, _ = ENCODER_ONLY
  ckpt = torch.load(os.path.join(out_dir, f"{name}.pth"), map_location="cpu", weights_only=True)
  assert set(ckpt["model"]) == set(official_keys(arch["depth"], 0, with_decoder=False))
  print(f"ok {name}: {len(ckpt['model'])} encoder-only keys")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--out", default="tests/fixtures", help="fixture directory")
  parser.add_argument("--check", action="store_true", help="only verify existing fixtures")
  args = parser.parse_args(argv)
  _set_deterministic()
  if not args.check:
    generate(args.out)
  check(args.out)
  print(f"torch {torch.__version__}, numpy {np.__version__}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

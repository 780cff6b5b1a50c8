"""The DALL-E dVAE image tokenizer's encoder in Flax linen (inference only).

    module, params = dvae_import.load("dalle_encoder")      # OpenAI's published weights
    codes = tokens(params, module, images01)                # (B, H / 8, W / 8) int32

A port of OpenAI's `dall_e` package (`dall_e/encoder.py`, `dall_e/utils.py`): the
visual tokenizer BEiT-style methods such as PMAD predict. A 7x7 conv, then `group_count`
groups of `n_blk_per_group` residual blocks whose width doubles per group (`n_hid` x 1, 2,
4, 8), a 2x2 max-pool after every group but the last, and a ReLU + 1x1 conv to
`vocab_size` logits per position. Each block adds `post_gain * res_path(x)` to
`id_path(x)` (a 1x1 conv where the width changes, else the identity); `res_path` is four
ReLU + conv pairs (3x3, 3x3, 3x3, 1x1) through a bottleneck of a quarter of the block's
width. `post_gain = 1 / (group_count * n_blk_per_group) ** 2` keeps the sum of the
residual branches small at initialisation.

Inputs are NHWC images in [0, 1]; `map_pixels` moves them into [eps, 1 - eps] (eps 0.1),
the range the dVAE's logit-Laplace likelihood was trained on, as `dall_e.map_pixels` does.
With the public `group_count` of 4 the grid is the image downsampled by 8: 112 px gives
14 x 14 codes. Sides that do not divide by 8 are floored at each pool, like
`torch.nn.MaxPool2d(2)`.

Parameter names mirror the PyTorch state-dict keys: `blocks.group_1.block_1.res_path.
conv_1.w` is `params["blocks"]["group_1"]["block_1"]["res_path"]["conv_1"]["w"]`, so an
import is a split on dots plus the conv weight transpose OIHW -> HWIO
(`maeday_jax.models.dvae_import`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

LOGIT_LAPLACE_EPS = 0.1
"""`dall_e.utils.logit_laplace_eps`: the margin `map_pixels` keeps from 0 and 1."""

ARCH_FIELDS = ("group_count", "n_hid", "n_blk_per_group", "input_channels", "vocab_size")
"""The fields that make up the architecture (`architecture(module)`)."""

PUBLIC = dict(group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192)
"""The architecture of OpenAI's published `encoder.pkl` (the `dall_e.Encoder` defaults)."""


def map_pixels(x: jax.Array) -> jax.Array:
  """Images in [0, 1] -> [eps, 1 - eps], as `dall_e.map_pixels` (eps = 0.1)."""
  return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class Conv2d(nn.Module):
  """`dall_e.utils.Conv2d`: a square, odd-sized, stride-1 conv with 'same' padding.

  Attributes:
    n_out: output channels.
    kw: kernel size (odd).
    dtype: compute dtype (parameters stay float32). The public code runs every conv but
      the output one in float16 on GPUs; here the caller chooses.
  """

  n_out: int
  kw: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = x.shape[-1]
    # The public initialisation: N(0, 1 / fan_in) weights, zero biases.
    std = 1 / math.sqrt(n_in * self.kw**2)
    init = lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)  # noqa: E731
    w = self.param("w", init, (self.kw, self.kw, n_in, self.n_out))  # HWIO
    b = self.param("b", nn.initializers.zeros, (self.n_out,), jnp.float32)
    pad = (self.kw - 1) // 2
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      w.astype(self.dtype),
      window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      # Full float32 on accelerators (no TF32): the tokens are an argmax over logits,
      # and near-ties should break as the reference breaks them.
      precision=jax.lax.Precision.HIGHEST,
    )
    return y + b.astype(self.dtype)


class ResPath(nn.Module):
  """The residual branch of `EncoderBlock`: ReLU + conv four times (3x3, 3x3, 3x3, 1x1).

  Attributes:
    n_hid: the bottleneck width (a quarter of `n_out`).
    n_out: output channels.
    dtype: compute dtype.
  """

  n_hid: int
  n_out: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    widths_and_sizes = ((self.n_hid, 3), (self.n_hid, 3), (self.n_hid, 3), (self.n_out, 1))
    for i, (n_out, kw) in enumerate(widths_and_sizes, start=1):
      x = Conv2d(n_out, kw, self.dtype, name=f"conv_{i}")(nn.relu(x))
    return x


class EncoderBlock(nn.Module):
  """`dall_e.encoder.EncoderBlock`: `id_path(x) + post_gain * res_path(x)`.

  Attributes:
    n_out: output channels (a multiple of 4).
    post_gain: scale of the residual branch, 1 / (number of blocks in the encoder) ** 2.
    dtype: compute dtype.
  """

  n_out: int
  post_gain: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.n_out % 4:
      raise ValueError(f"EncoderBlock: n_out {self.n_out} is not a multiple of 4.")
    identity = x
    if x.shape[-1] != self.n_out:  # Where the width changes the shortcut is a 1x1 conv.
      identity = Conv2d(self.n_out, 1, self.dtype, name="id_path")(x)
    residual = ResPath(self.n_out // 4, self.n_out, self.dtype, name="res_path")(x)
    return identity + self.post_gain * residual


class Group(nn.Module):
  """One `blocks.group_<k>`: `n_blk` blocks of width `n_out`, then an optional 2x2 max-pool.

  Attributes:
    n_out: the blocks' width.
    n_blk: number of blocks.
    post_gain: the blocks' residual scale.
    pool: whether a 2x2 max-pool follows (every group but the last).
    dtype: compute dtype.
  """

  n_out: int
  n_blk: int
  post_gain: float
  pool: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(1, self.n_blk + 1):
      x = EncoderBlock(self.n_out, self.post_gain, self.dtype, name=f"block_{i}")(x)
    if self.pool:
      # torch's MaxPool2d(2): no padding, odd sides floored.
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    return x


class Output(nn.Module):
  """`blocks.output`: ReLU and a 1x1 conv to the vocabulary's logits.

  Attributes:
    vocab_size: number of codes.
  """

  vocab_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # Always float32, as the public code (`use_float16=False`): the argmax needs it.
    return Conv2d(self.vocab_size, 1, jnp.float32, name="conv")(nn.relu(x.astype(jnp.float32)))


class Blocks(nn.Module):
  """`Encoder.blocks`: input conv, the groups, the output head.

  Attributes: as `DalleEncoder`'s.
  """

  group_count: int
  n_hid: int
  n_blk_per_group: int
  vocab_size: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv2d(self.n_hid, 7, self.dtype, name="input")(x)
    post_gain = 1 / (self.group_count * self.n_blk_per_group) ** 2
    for g in range(1, self.group_count + 1):
      last = g == self.group_count
      width = self.n_hid * 2 ** (g - 1)
      x = Group(width, self.n_blk_per_group, post_gain, not last, self.dtype, name=f"group_{g}")(x)
    return Output(self.vocab_size, name="output")(x)


class DalleEncoder(nn.Module):
  """OpenAI's DALL-E dVAE encoder: NHWC images (already `map_pixels`-ed) -> code logits.

  Attributes:
    group_count: number of groups (4 in the public code, where it is fixed); the image is
      downsampled by `2 ** (group_count - 1)`.
    n_hid: width of the first group (the groups have n_hid x 1, 2, 4, 8, ...).
    n_blk_per_group: residual blocks per group.
    input_channels: channels of the input images.
    vocab_size: number of codes (the logits' last axis).
    dtype: compute dtype of every conv but the output one (parameters and logits stay
      float32).
  """

  group_count: int = 4
  n_hid: int = 256
  n_blk_per_group: int = 2
  input_channels: int = 3
  vocab_size: int = 8192
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, input_channels) mapped pixels -> (B, h, w, vocab_size) float32 logits."""
    if x.ndim != 4 or x.shape[-1] != self.input_channels:
      raise ValueError(
        f"DalleEncoder: expected NHWC images with {self.input_channels} channels, got shape "
        f"{tuple(x.shape)}."
      )
    blocks = Blocks(
      self.group_count, self.n_hid, self.n_blk_per_group, self.vocab_size, self.dtype, name="blocks"
    )
    return blocks(x)


def architecture(module: DalleEncoder) -> dict:
  """The architecture fields of `module` (`ARCH_FIELDS`), e.g. to compare with `PUBLIC`."""
  return {field: getattr(module, field) for field in ARCH_FIELDS}


def _params(params: dict) -> dict:
  """Accepts the parameter tree or the variables `{"params": tree}`."""
  return params.get("params", params)


def token_logits(params: dict, module: DalleEncoder, images01: jax.Array) -> jax.Array:
  """Code logits for NHWC images in [0, 1]: (B, H / 8, W / 8, vocab_size) float32.

  Applies `map_pixels` first, as the public code expects its callers to. Jittable (close
  over `module` or mark it static).
  """
  x = map_pixels(jnp.asarray(images01, jnp.float32))
  return module.apply({"params": _params(params)}, x)


def tokens(params: dict, module: DalleEncoder, images01: jax.Array) -> jax.Array:
  """The visual tokens: the argmax code per position, (B, H / 8, W / 8) int32."""
  return jnp.argmax(token_logits(params, module, images01), axis=-1).astype(jnp.int32)

"""ResNets in Flax linen, computed exactly as torchvision computes them (inference only).

    model = resnet.create("wide_resnet50_2")
    features = model.apply(variables, images, stages=("layer2", "layer3"))
    features["layer2"].shape  # (B, H / 8, W / 8, 512)

The layout is torchvision's (`torchvision.models.resnet`, the "v1.5" ResNet): a 7x7/2 conv
without bias, BatchNorm, ReLU and a 3x3/2 max-pool (padding 1) form the stem; `layer1` ..
`layer4` stack BasicBlocks (ResNet-18/34) or Bottlenecks (ResNet-50 and up, the wide
ResNets) whose first block strides (layer2 .. layer4) on the 3x3 conv, with a 1x1 conv + BN
`downsample` on the shortcut wherever the shape changes. BatchNorm always uses its running
statistics (eps 1e-5): these models extract features, they are not trained here.

Inputs are NHWC `(B, H, W, 3)` images in ImageNet-normalised space
(`maeday_jax.imagenet.normalize`); every output is NHWC too. Module and variable names
mirror the torchvision keys, so a state dict maps onto the variables by renaming alone:
`layer2.0.downsample.0.weight` is `params/layer2_0/downsample_0/kernel`,
`bn1.running_var` is `batch_stats/bn1/var` (see `maeday_jax.models.resnet_import`).

Parameters are float32; `dtype` only sets the compute precision (e.g. bfloat16 on
accelerators), and the returned features have that dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
"""The feature maps `ResNet.__call__` can return, shallowest first ("stem": after the
max-pool)."""

STAGE_STRIDES = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
"""Input pixels per feature-map pixel, per stage (for inputs whose sides divide by 32)."""

BLOCKS = ("basic", "bottleneck")

EXPANSION = {"basic": 1, "bottleneck": 4}
"""Output channels of a block / its planes (torchvision's `expansion`)."""

BN_EPSILON = 1e-5

# torchvision's initialisation: kaiming-normal convs (fan-out, ReLU gain); BatchNorm
# scale 1, bias 0, running mean 0 and variance 1 (the Flax defaults).
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _convolutions(dtype: Dtype):
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, kernel_init=_conv_init)
  norm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=BN_EPSILON, dtype=dtype)
  return conv, norm


_SAME_3x3 = ((1, 1), (1, 1))


class BasicBlock(nn.Module):
  """Two 3x3 convs with BN, plus the shortcut: torchvision's `BasicBlock`.

  Attributes:
    planes: output channels (and those of the first conv).
    stride: stride of the first 3x3 conv and of the downsample.
    downsample: whether the shortcut is a 1x1 conv + BN (`downsample.0/1`).
    dtype: compute dtype.
  """

  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv, norm = _convolutions(self.dtype)
    y = conv(self.planes, (3, 3), strides=self.stride, padding=_SAME_3x3, name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.planes, (3, 3), padding=_SAME_3x3, name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.downsample:
      x = conv(self.planes, (1, 1), strides=self.stride, padding="VALID", name="downsample_0")(x)
      x = norm(name="downsample_1")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand, with BN, plus the shortcut: torchvision's
  `Bottleneck` (stride on the 3x3 conv, "ResNet v1.5").

  Attributes:
    planes: `out_channels / 4`.
    width: channels of the inner 1x1 and 3x3 convs (`planes` for ResNet-50, `2 * planes`
      for WideResNet-50-2).
    stride: stride of the 3x3 conv and of the downsample.
    downsample: whether the shortcut is a 1x1 conv + BN (`downsample.0/1`).
    dtype: compute dtype.
  """

  planes: int
  width: int
  stride: int = 1
  downsample: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv, norm = _convolutions(self.dtype)
    out = self.planes * EXPANSION["bottleneck"]
    y = conv(self.width, (1, 1), padding="VALID", name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.width, (3, 3), strides=self.stride, padding=_SAME_3x3, name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(out, (1, 1), padding="VALID", name="conv3")(y)
    y = norm(name="bn3")(y)
    if self.downsample:
      x = conv(out, (1, 1), strides=self.stride, padding="VALID", name="downsample_0")(x)
      x = norm(name="downsample_1")(x)
    return nn.relu(y + x)


def _requested(stages: str | Iterable[str]) -> tuple[str, ...]:
  names = (stages,) if isinstance(stages, str) else tuple(stages)
  unknown = [s for s in names if s not in STAGES]
  if unknown or not names:
    raise ValueError(
      f"stages={stages!r}: expected one or more of {', '.join(STAGES)}"
      + (f" (unknown: {', '.join(map(repr, unknown))})." if unknown else ".")
    )
  return tuple(dict.fromkeys(names))  # Without repeats, in the order asked for.


class ResNet(nn.Module):
  """A torchvision-layout ResNet that returns intermediate feature maps.

  `model.apply(variables, images, stages=("layer2", "layer3"))` returns
  `{"layer2": (B, H/8, W/8, C2), "layer3": (B, H/16, W/16, C3)}`: exactly the stages asked
  for, and nothing past the deepest of them is computed. `variables` holds "params" and
  "batch_stats" (the BatchNorm running statistics, always used; never updated).

  A call creates only the variables of the stages it computes: call `model.init` with
  the default (all stages), or use `init_variables`, which draws the same distribution
  without compiling one initialiser per convolution.

  Attributes:
    block: "basic" (ResNet-18/34) or "bottleneck" (ResNet-50/101/152, wide ResNets).
    layers: number of blocks in layer1 .. layer4, e.g. (2, 2, 2, 2) for ResNet-18.
    width: channels of the stem, and planes of layer1; layer k has `width * 2**(k-1)`
      planes and `EXPANSION[block]` times as many output channels. 64 in torchvision.
    width_per_group: inner width of layer1's bottlenecks (doubling per layer like the
      planes): 64 for ResNet-50, 128 for WideResNet-50-2. None means `width`. Basic
      blocks have no inner width, so for them it must be None or `width`.
    dtype: compute dtype (parameters stay float32); the features come back in it.
  """

  block: str = "bottleneck"
  layers: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  width_per_group: int | None = None
  dtype: Dtype = jnp.float32

  def __post_init__(self):
    super().__post_init__()
    if self.block not in BLOCKS:
      raise ValueError(f"block={self.block!r}: expected one of {BLOCKS}.")
    if len(self.layers) != 4 or not all(isinstance(n, int) and n >= 1 for n in self.layers):
      raise ValueError(f"layers={self.layers!r}: expected four positive block counts.")
    if self.width < 1:
      raise ValueError(f"width={self.width!r}: expected a positive channel count.")
    if self.block == "basic" and self.width_per_group not in (None, self.width):
      raise ValueError(
        f"width_per_group={self.width_per_group} needs bottleneck blocks (basic blocks "
        "have no inner width)."
      )

  def channels(self, stage: str) -> int:
    """Channels of the feature map `stage` (e.g. 512 for ResNet-50's "layer2")."""
    (stage,) = _requested(stage)
    if stage == "stem":
      return self.width
    k = STAGES.index(stage) - 1
    return self.width * 2**k * EXPANSION[self.block]

  @nn.compact
  def __call__(self, images: jax.Array, stages: str | Iterable[str] = STAGES) -> dict:
    wanted = _requested(stages)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images of shape {images.shape}: expected NHWC RGB images (B, H, W, 3).")
    conv, norm = _convolutions(self.dtype)
    x = images.astype(self.dtype)
    x = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_SAME_3x3)
    features = {"stem": x}
    deepest = max(STAGES.index(s) for s in wanted)
    in_channels = self.width
    inner = self.width_per_group or self.width
    for k in range(1, deepest + 1):
      planes = self.width * 2 ** (k - 1)
      out_channels = planes * EXPANSION[self.block]
      for i in range(self.layers[k - 1]):
        stride = 2 if k > 1 and i == 0 else 1
        shape_changes = stride != 1 or in_channels != out_channels
        common = dict(stride=stride, downsample=shape_changes, dtype=self.dtype)
        name = f"layer{k}_{i}"
        if self.block == "basic":
          x = BasicBlock(planes, **common, name=name)(x)
        else:
          x = Bottleneck(planes, inner * 2 ** (k - 1), **common, name=name)(x)
        in_channels = out_channels
      features[f"layer{k}"] = x
    return {s: features[s] for s in wanted}


VARIANTS: dict[str, dict[str, Any]] = {
  "resnet18": dict(block="basic", layers=(2, 2, 2, 2)),
  "resnet34": dict(block="basic", layers=(3, 4, 6, 3)),
  "resnet50": dict(block="bottleneck", layers=(3, 4, 6, 3)),
  "resnet101": dict(block="bottleneck", layers=(3, 4, 23, 3)),
  "wide_resnet50_2": dict(block="bottleneck", layers=(3, 4, 6, 3), width_per_group=128),
  "wide_resnet101_2": dict(block="bottleneck", layers=(3, 4, 23, 3), width_per_group=128),
  # Tiny models for the tests and their fixtures (tests/fixtures/resnet_ref_*): every
  # code path of the full models (a layer with two blocks, downsamples, a wide bottleneck)
  # at a few hundred kB of weights.
  "test_resnet": dict(block="basic", layers=(2, 1, 1, 1), width=8),
  "test_wide": dict(block="bottleneck", layers=(1, 2, 1, 1), width=4, width_per_group=8),
}
"""Architectures by name: the torchvision models and two tiny test models."""


def create(variant: str, **overrides) -> ResNet:
  """Builds a ResNet of a named variant, e.g. `create("resnet18", dtype=jnp.bfloat16)`."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown ResNet variant {variant!r}; choose one of {sorted(VARIANTS)}.")
  return ResNet(**{**VARIANTS[variant], **overrides})


def init_variables(model: ResNet, key: jax.Array) -> dict:
  """Random torchvision-style variables {"params", "batch_stats"} for every stage of
  `model`, e.g. for smoke tests: conv kernels ~ N(0, 2 / fan_out) (kaiming-normal, as
  `model.init` draws them), BatchNorm scale 1, bias 0, mean 0, variance 1.

  All kernels come from one draw of `key`, which compiles in a fraction of the time
  `model.init` takes (one random-number kernel instead of one per convolution).
  """
  shapes = variable_shapes(model)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes["params"])
  kernels = [leaf.shape for path, leaf in leaves if path[-1].key == "kernel"]
  draw = np.asarray(jax.random.normal(key, (sum(math.prod(s) for s in kernels),)))
  params, start = [], 0
  for path, leaf in leaves:
    name = path[-1].key
    if name == "kernel":
      size = math.prod(leaf.shape)
      fan_out = size // leaf.shape[-2]  # kh * kw * out_channels
      value = draw[start : start + size].reshape(leaf.shape) * np.sqrt(2.0 / fan_out)
      start += size
    else:
      value = np.full(leaf.shape, 1.0 if name == "scale" else 0.0)
    params.append(jnp.asarray(value, jnp.float32))
  stats = jax.tree_util.tree_map_with_path(
    lambda path, leaf: jnp.full(leaf.shape, 1.0 if path[-1].key == "var" else 0.0),
    shapes["batch_stats"],
  )
  return {"params": jax.tree_util.tree_unflatten(treedef, params), "batch_stats": stats}


def variable_shapes(model: ResNet) -> dict:
  """The variable tree {"params", "batch_stats"} of `model` as `jax.ShapeDtypeStruct`s,
  without allocating or compiling anything."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, stages=STAGES), jax.random.key(0), images)
  return dict(shapes)

"""Independent PyTorch ResNet (torchvision layout) and the backbone test-fixture writer.

This is an OPTIONAL tool: it needs PyTorch and NumPy, which `maeday_jax` itself never
imports. The model below is written from torchvision's `torchvision/models/resnet.py`
definition (ResNet v1.5: stride on the bottleneck's 3x3 conv; 1x1 conv + BN downsample
where the shape changes; BatchNorm eps 1e-5) in plain `torch.nn`, without torchvision,
so its state-dict keys are torchvision's (`conv1.weight`, `bn1.running_mean`,
`layer2.0.downsample.0.weight`, ..., `fc.bias`).

It writes, into `--out` (tests/fixtures):

* `resnet_ref_basic.pth`, `resnet_ref_bottleneck.pth`: `torch.save(model.state_dict())` of
  the two tiny test architectures (maeday_jax's `test_resnet` and `test_wide`), with
  random weights and non-trivial BatchNorm statistics and affine parameters, and
* `resnet_ref_io.npz`: two uint8 224 x 224 input images (NHWC) and, for each model in
  `.eval()`, the stem (after the max-pool) and layer1 .. layer4 outputs as NHWC float32.

Regenerate (deterministic: every number comes from fixed NumPy seeds; torch runs
single-threaded), then self-check by reloading with `torch.load(weights_only=True)`:

    /work/venv-torch/bin/python tools/references/torch_resnet_reference.py --out tests/fixtures

Re-check existing fixtures without writing:

    /work/venv-torch/bin/python tools/references/torch_resnet_reference.py --out tests/fixtures \\
      --check

Compare full-width resnet18 and wide_resnet50_2 (random weights) against maeday_jax in
one process (needs JAX and maeday_jax importable as well, e.g. with the repository's
`.venv/lib/python3.11/site-packages` and the repository root on PYTHONPATH):

    PYTHONPATH=.:.venv/lib/python3.11/site-packages \\
      /work/venv-torch/bin/python tools/references/torch_resnet_reference.py --check-full-width
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch import nn

# The tiny architectures of the fixtures; they equal maeday_jax.backbones.VARIANTS'
# "test_resnet" and "test_wide" (width = stem channels = layer1 planes; width_per_group
# = layer1's bottleneck inner width, torchvision's `width_per_group` at width 64).
ARCHS = {
  "basic": dict(block="basic", layers=(2, 1, 1, 1), width=8, width_per_group=8),
  "bottleneck": dict(block="bottleneck", layers=(1, 2, 1, 1), width=4, width_per_group=8),
}
FULL_WIDTH = {
  "resnet18": dict(block="basic", layers=(2, 2, 2, 2), width=64, width_per_group=64),
  "wide_resnet50_2": dict(block="bottleneck", layers=(3, 4, 6, 3), width=64, width_per_group=128),
}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
NUM_CLASSES = 10  # A small classifier, so the files carry `fc.*` like torchvision's.
IMAGE_SIZE = 224
BATCH = 2
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), dtype=np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), dtype=np.float32)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1, downsample=None, inner=None):
    super().__init__()
    self.conv1 = conv3x3(inplanes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1, downsample=None, inner=None):
    super().__init__()
    width = inner or planes
    self.conv1 = conv1x1(inplanes, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = conv3x3(width, width, stride)  # v1.5: the stride sits on the 3x3 conv.
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = conv1x1(width, planes * self.expansion)
    self.bn3 = nn.BatchNorm2d(planes * self.expansion)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    identity = x
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
      identity = self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """torchvision's ResNet with configurable stem width; `forward` returns every stage."""

  def __init__(self, block, layers, width=64, width_per_group=64, num_classes=1000):
    super().__init__()
    block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
    self.inplanes = width
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    for k, blocks in enumerate(layers):
      planes, inner = width * 2**k, width_per_group * 2**k
      stride = 1 if k == 0 else 2
      setattr(self, f"layer{k + 1}", self._make_layer(block_cls, planes, blocks, stride, inner))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(width * 8 * block_cls.expansion, num_classes)

  def _make_layer(self, block_cls, planes, blocks, stride, inner):
    downsample = None
    if stride != 1 or self.inplanes != planes * block_cls.expansion:
      downsample = nn.Sequential(
        conv1x1(self.inplanes, planes * block_cls.expansion, stride),
        nn.BatchNorm2d(planes * block_cls.expansion),
      )
    layers = [block_cls(self.inplanes, planes, stride, downsample, inner)]
    self.inplanes = planes * block_cls.expansion
    layers += [block_cls(self.inplanes, planes, inner=inner) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    out = {}
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    out["stem"] = x
    for name in STAGES[1:]:
      x = getattr(self, name)(x)
      out[name] = x
    out["logits"] = self.fc(torch.flatten(self.avgpool(x), 1))
    return out


def randomize(model: nn.Module, seed: int) -> None:
  """Random weights from NumPy (reproducible across torch versions): kaiming-normal convs
  (fan-out, as torchvision), and BatchNorm running_mean ~ N(0, 0.5), running_var ~
  U(0.5, 2), weight ~ U(0.5, 1.5), bias ~ N(0, 0.2), so every statistic matters."""
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        w = module.weight
        fan_out = w.shape[0] * w.shape[2] * w.shape[3]
        w.copy_(torch.from_numpy(rng.normal(0, np.sqrt(2 / fan_out), w.shape).astype("f4")))
      elif isinstance(module, nn.BatchNorm2d):
        n = module.num_features
        module.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.5, n).astype("f4")))
        module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, n).astype("f4")))
        module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype("f4")))
        module.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, n).astype("f4")))
        module.num_batches_tracked.fill_(int(rng.integers(1, 1000)))
      elif isinstance(module, nn.Linear):
        bound = 1 / np.sqrt(module.in_features)
        module.weight.copy_(
          torch.from_numpy(rng.uniform(-bound, bound, module.weight.shape).astype("f4"))
        )
        module.bias.copy_(
          torch.from_numpy(rng.uniform(-bound, bound, module.out_features).astype("f4"))
        )


def make_pixels(seed: int = 0, batch: int = BATCH, size: int = IMAGE_SIZE) -> np.ndarray:
  """Image-like uint8 NHWC inputs: smooth colour fields, a few edges, mild noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (batch, 7, 7, 3))
  smooth = coarse.repeat(size // 7, axis=1).repeat(size // 7, axis=2)
  yy, xx = np.mgrid[0:size, 0:size] / size
  ramp = 60 * np.sin(2 * np.pi * (3 * xx + 2 * yy))[None, :, :, None]
  noise = rng.normal(0, 12, (batch, size, size, 3))
  return np.clip(smooth + ramp + noise, 0, 255).round().astype(np.uint8)


def normalize(pixels: np.ndarray) -> np.ndarray:
  """`maeday_jax.imagenet.normalize`, the same float32 operations in NumPy."""
  x = np.asarray(pixels, dtype=np.float32) / 255.0
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def run(model: nn.Module, images_nhwc: np.ndarray) -> dict[str, np.ndarray]:
  """Every stage of `model.eval()` for NHWC float32 images, as NHWC float32 arrays."""
  model.eval()
  with torch.no_grad():
    out = model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous())
  return {s: out[s].permute(0, 2, 3, 1).contiguous().numpy() for s in STAGES}


def build(arch: dict, seed: int) -> nn.Module:
  model = ResNet(**arch, num_classes=NUM_CLASSES)
  randomize(model, seed)
  return model.eval()


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
  """max |a - b| / max |b|."""
  return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def write(out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  pixels = make_pixels()
  images = normalize(pixels)
  arrays: dict[str, np.ndarray] = {"pixels": pixels}
  for seed, (kind, arch) in enumerate(ARCHS.items(), start=1):
    model = build(arch, seed)
    torch.save(model.state_dict(), os.path.join(out_dir, f"resnet_ref_{kind}.pth"))
    for stage, value in run(model, images).items():
      arrays[f"{kind}_{stage}"] = value
    arrays[f"{kind}_layers"] = np.array(arch["layers"], np.int32)
    arrays[f"{kind}_width"] = np.array(arch["width"], np.int32)
    arrays[f"{kind}_width_per_group"] = np.array(arch["width_per_group"], np.int32)
  np.savez_compressed(os.path.join(out_dir, "resnet_ref_io.npz"), **arrays)


def check(out_dir: str) -> None:
  """Reloads the fixtures and asserts a fresh model reproduces the stored outputs."""
  io = np.load(os.path.join(out_dir, "resnet_ref_io.npz"))
  images = normalize(io["pixels"])
  for kind, arch in ARCHS.items():
    path = os.path.join(out_dir, f"resnet_ref_{kind}.pth")
    model = ResNet(**arch, num_classes=NUM_CLASSES)
    model.load_state_dict(torch.load(path, weights_only=True))
    for stage, value in run(model, images).items():
      stored = io[f"{kind}_{stage}"]
      err = rel_error(value, stored)
      print(
        f"{kind:10s} {stage:6s} {str(stored.shape):18s} max|x| {np.abs(stored).max():8.3f}"
        f"  rel err {err:.2e}  zeros {np.mean(stored == 0):.0%}"
      )
      assert err == 0.0, (kind, stage, err)
    # float64 recomputation: how far float32 itself is from exact, per stage.
    exact = run(model.double(), images.astype(np.float64))
    worst = max(rel_error(io[f"{kind}_{s}"], exact[s]) for s in STAGES)
    print(f"{kind:10s} float32 vs float64 worst rel err {worst:.2e}")
  sizes = {
    name: os.path.getsize(os.path.join(out_dir, name))
    for name in sorted(os.listdir(out_dir))
    if name.startswith("resnet_ref_")
  }
  print("fixture sizes:", sizes, "total", sum(sizes.values()))


def check_full_width() -> int:
  """Random full-width resnet18 / wide_resnet50_2 here and in maeday_jax; compares all
  stages at 224 px. Returns the number of stages over 1e-4 relative error."""
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  from maeday_jax import backbones, imagenet

  images = imagenet.normalize(make_pixels(seed=7, batch=1))
  failures = 0
  for seed, (name, arch) in enumerate(FULL_WIDTH.items(), start=11):
    model = build(arch, seed)
    expected = run(model, images)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    flax_model, variables = backbones.from_state_dict(state, source=name)
    assert flax_model == backbones.create(name), (flax_model, backbones.create(name))
    apply = jax.jit(flax_model.apply, static_argnames="stages")
    got = apply(variables, images, stages=STAGES)
    for stage in STAGES:
      err = rel_error(np.asarray(got[stage]), expected[stage])
      failures += err > 1e-4
      print(f"{name:16s} {stage:6s} {str(expected[stage].shape):20s} rel err {err:.2e}")
  print("full-width check:", "OK" if not failures else f"{failures} stages over 1e-4")
  return failures


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="tests/fixtures", help="fixture folder")
  parser.add_argument("--check", action="store_true", help="only verify existing fixtures")
  parser.add_argument(
    "--check-full-width",
    action="store_true",
    help="compare random full-width resnet18 / wide_resnet50_2 with maeday_jax (needs JAX)",
  )
  args = parser.parse_args(argv)
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  if args.check_full_width:
    return 1 if check_full_width() else 0
  if not args.check:
    write(args.out)
  check(args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())

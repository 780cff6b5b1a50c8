"""ImageNet ResNet backbones (torchvision layout) for feature-based detectors such as PatchCore.

    from maeday_jax import backbones
    model, variables = backbones.load_backbone("wide_resnet50_2")   # or a local path
    features = model.apply(variables, images, stages=("layer2", "layer3"))
    features["layer2"].shape  # (B, H / 8, W / 8, 512), NHWC

`images` are NHWC RGB in ImageNet-normalised space (`maeday_jax.imagenet.normalize`).

The network is `maeday_jax.models.resnet` and its weight loading
`maeday_jax.models.resnet_import` (known names through the shared resolver
`maeday_jax.models.weights`, files read by `maeday_jax.weight_files`); this package
gathers their names in one place.
`backbones.resnet` and `backbones.convert` are those two modules.

Known names (`KNOWN_BACKBONES`) download torchvision's published weights once into
`<cache>/backbones/` (`$MAEDAY_CACHE_DIR`, default `~/.cache/maeday_jax`), checking the
SHA-256 prefix in the file name. A path may be any torchvision or timm ResNet state dict,
as `.pth` (read without running code from the file) or `.safetensors`; the architecture
is inferred from it. PyTorch is never needed.
"""

from __future__ import annotations

from maeday_jax.download import DownloadError
from maeday_jax.models import resnet, weights
from maeday_jax.models import resnet_import as convert
from maeday_jax.models.resnet import (
  STAGE_STRIDES,
  STAGES,
  VARIANTS,
  BasicBlock,
  Bottleneck,
  ResNet,
  create,
  init_variables,
  variable_shapes,
)
from maeday_jax.models.resnet_import import (
  KNOWN_BACKBONES,
  from_state_dict,
  infer_architecture,
  load_backbone,
  read_state_dict,
  resolve,
)
from maeday_jax.weight_files import CheckpointError

CACHE_SUBDIR = weights.KINDS["backbone"].subdir  # Known names download to <cache>/backbones/.

__all__ = [
  "CACHE_SUBDIR",
  "KNOWN_BACKBONES",
  "STAGES",
  "STAGE_STRIDES",
  "VARIANTS",
  "BasicBlock",
  "Bottleneck",
  "CheckpointError",
  "DownloadError",
  "ResNet",
  "convert",
  "create",
  "from_state_dict",
  "infer_architecture",
  "init_variables",
  "load_backbone",
  "read_state_dict",
  "resnet",
  "resolve",
  "variable_shapes",
]

"""PatchCore (`maeday_jax.patchcore`, `backbones`): the `patchcore` section. Light:
imports nothing but `ml_collections` (see `maeday_jax.settings`).
"""

from __future__ import annotations

import ml_collections


def patchcore_config() -> ml_collections.ConfigDict:
  """PatchCore settings (spec §1; `maeday_jax.patchcore`), the few-shot job's `patchcore`.

  Fields:
    backbone: a known name (wide_resnet50_2, resnet18, resnet50: torchvision ImageNet
      weights, downloaded and checked), a torchvision `.pth` / timm `.safetensors` file,
      or 'random' (randomly initialised `variant`: smoke tests only).
    variant: the architecture for backbone='random' (`maeday_jax.backbones.VARIANTS`).
    image_size: input size of the backbone (224: layer2 at 28 x 28).
    coreset_ratio: fraction of the shots' patch embeddings kept in the memory bank.
    cache_dir: download cache ('' = $MAEDAY_CACHE_DIR or ~/.cache/maeday_jax).
  """
  return ml_collections.ConfigDict(
    dict(
      backbone="wide_resnet50_2",
      variant="wide_resnet50_2",
      image_size=224,
      coreset_ratio=0.1,
      cache_dir="",
    )
  )

"""Every network, with the code that loads its weights beside it.

  vit_layers        the transformer layers the ViTs share (attention paths, MLP, SwiGLU,
                    layer scale, the pre-norm block)
  vit_mae           the ViT-MAE, with `masking`, `patches`, `pos_embed`
  mae_import        official / Hugging Face / converted MAE weights -> `vit_mae`
                    (`load_mae`), with `mae_state_dict` (official keys <-> Flax paths)
  resnet            torchvision-layout ResNets / WideResNets for feature detectors
  resnet_import     torchvision / timm ResNet weights -> `resnet` (`load_backbone`)
  segmenter         MALA's segmenter (MAE + Token Balance Module)
  dinov2            the DINOv2 ViT (official position resizing), `dinov2_import` its
                    official / timm / Hugging Face weights
  clip              CLIP's image and text towers (OpenAI layout), `clip_import` its
                    open_clip / Hugging Face weights, `clip_tokenizer` the BPE tokenizer
                    (packaged vocabulary in `clip_vocab/`)
  features          `load(name, checkpoint=...)`: one entry point for feature networks
                    (`net.patch_tokens(images, layers=...)`)
  weights           the known names -> URL + hash table, the one resolver
                    (`weights.resolve`) and checkpoint fingerprints (`weights.sha256_of`)

The importers read their files through `maeday_jax.weight_files` (the file formats, below
every network); `maeday_jax.checkpoints` and `maeday_jax.backbones` gather the importers'
names for users. The names below are the ViT-MAE's (`models.create("large")`, ...); the
other networks are reached through their modules (`models.resnet.create("resnet18")`).
The importers are imported on demand: they pull in the file readers (and Orbax), which
building or running a network does not need.
"""

from maeday_jax.models import clip, dinov2, masking, patches, pos_embed, resnet, segmenter, weights
from maeday_jax.models.features import load
from maeday_jax.models.resnet import ResNet
from maeday_jax.models.segmenter import Segmenter
from maeday_jax.models.vit_mae import (
  ARCH_FIELDS,
  ATTENTION_IMPLEMENTATIONS,
  VARIANTS,
  MaskedAutoencoder,
  architecture,
  create,
  init_params,
  num_params,
  param_shapes,
  resolve_attention,
)

__all__ = [
  "ARCH_FIELDS",
  "ATTENTION_IMPLEMENTATIONS",
  "VARIANTS",
  "MaskedAutoencoder",
  "ResNet",
  "Segmenter",
  "architecture",
  "clip",
  "create",
  "dinov2",
  "load",
  "init_params",
  "masking",
  "num_params",
  "param_shapes",
  "resnet",
  "resolve_attention",
  "patches",
  "pos_embed",
  "segmenter",
  "weights",
]

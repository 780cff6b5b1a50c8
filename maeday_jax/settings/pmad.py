"""PMAD's settings (`maeday_jax.detectors.pmad`): the reconstruction model and its
training, the prediction target, the prototypes, the flow and the proposal masks. Light:
imports nothing but `ml_collections` (see `maeday_jax.settings`).
"""

from __future__ import annotations

import ml_collections

TARGETS = ("dvae", "codebook", "features", "pixels")
# Targets the model predicts as a distribution over codes (scored by its entropy); the
# others are regressed (scored by the squared error of the prediction).
CATEGORICAL_TARGETS = ("dvae", "codebook")
# How a patch is scored: 'entropy' (the paper: the entropy of the predicted codes of a
# masked patch x its abnormality), 'surprise' (-log p of the patch's own code x its
# abnormality; regressed targets always score their error), 'flow' (the prototypes'
# residual density alone: -log-likelihood of every patch, no reconstruction).
SCORINGS = ("entropy", "surprise", "flow")


def train_config() -> ml_collections.ConfigDict:
  """The reconstructor's training: AdamW with warm-up and cosine decay, the masks'
  ratio and the mix of strategies (`pmad.masking.STRATEGIES` = weight, comma-separated).
  """
  config = ml_collections.ConfigDict()
  config.batch_size = 32
  config.epochs = 100.0
  config.steps = 0  # > 0 overrides epochs.
  config.warmup_epochs = 5.0
  config.warmup_steps = ml_collections.FieldReference(None, int)
  config.lr = 5e-4
  config.min_lr = 1e-6
  config.weight_decay = 0.05
  config.b1 = 0.9
  config.b2 = 0.999
  config.grad_clip = 3.0
  config.mask_ratio = 0.4  # BEiT's 75 of 196 patches.
  config.strategies = "random=0.2,blockwise=0.4,frequency=0.1,dynamic=0.2,region=0.1"
  config.error_decay = 0.99  # The dynamic strategy's running mean of per-patch losses.
  # 0: whole images resized to the model's input; larger: images kept at this size and
  # each step trains on a random tile of the input size from each (tiled scoring).
  config.load_size = 0
  # Not 0: images kept at their own aspect ratio instead (short side this many px; -1:
  # their own size), each step a random window of the model's size of each: the tiles
  # that scoring with `tiling.resize_short_side` cuts. `load_size` is then not used.
  config.load_short_side = 0
  config.hflip = True
  config.vflip = False
  return config


PRETRAIN = "pretrain"  # `features.checkpoint`: train the feature MAE on the normal images.


def features_config() -> ml_collections.ConfigDict:
  """The frozen feature network of the prototypes (and of the `features` / `codebook`
  targets): any `models.load` name, its weights ('' = its public checkpoint, a file or
  folder, or 'random'), the layers concatenated after resizing to the patch grid, and
  the size it sees the images at (0: the reconstructor's input size).

  `checkpoint='pretrain'`: where no pre-trained network can be had, an MAE trained first
  on the same normal images (the job config's `model` section: its architecture, and
  `pretrain`: the recipe, as the `mae` detector's), resumable in the fit's work directory
  (`<workdir>/pmad_features/`); `backbone` then names its family (e.g. `mae_small`)."""
  return ml_collections.ConfigDict(
    {"backbone": "wide_resnet50_2", "checkpoint": "", "layers": (1, 2), "image_size": 0}
  )


def flow_config() -> ml_collections.ConfigDict:
  """The normalizing flow over prototype residuals (affine couplings), trained on the
  normal images' residuals; `projection_dim` > 0 first projects residuals to that many
  dimensions (a fixed random orthogonal projection) so the flow stays small for wide
  features; 0 keeps them whole."""
  return ml_collections.ConfigDict(
    {
      "couplings": 4,
      "hidden": 256,
      "steps": 1000,
      "batch_size": 1024,
      "lr": 1e-3,
      "projection_dim": 64,
    }
  )


def pmad_config() -> ml_collections.ConfigDict:
  """PMAD's section.

  Fields:
    variant, image_size: the reconstructor (`models.pmad_vit.VARIANTS`) and its input.
    target: what it predicts for a masked patch: 'dvae' (the DALL-E tokenizer's code,
      as the paper), 'codebook' (the code of the patch's feature in a k-means codebook of
      the normal images' features, `codebook_size` codes: a tokenizer learned here),
      'features' (the feature network's patch features, normalised) or 'pixels'.
    tokenizer: the dVAE's weights for 'dvae' (a known name or a file);
      `tokenizer_vocab` its expected vocabulary (another is refused, naming both).
    features: the feature network (`features_config`).
    coreset_ratio: the prototypes kept of the normal patches (greedy coreset), from at
      most `coreset_max_rows` patches drawn uniformly (0: all; the greedy selection reads
      every row once per prototype, so this bounds its time and memory).
    flow: `flow_config`.
    mask_ratio: the fraction of patches masked at inference (the most abnormal ones);
      `mask_ratios`: per-category overrides 'category=ratio,...'.
    scoring: how a patch is scored (`SCORINGS`; 'entropy' is the paper's).
    reconstructor: '' trains the reconstructor on `data` (+ `extra_data`); a folder of a
      previous PMAD training (`<workdir>/reconstructor`) reuses it (the cross-class
      protocol: prototypes and flow from this category's normal images only).
    train: `train_config`.
  """
  return ml_collections.ConfigDict(
    {
      "variant": "small",
      "image_size": 224,
      "target": "dvae",
      "tokenizer": "dalle_encoder",
      "tokenizer_vocab": 8192,
      "codebook_size": 512,
      "features": features_config(),
      "coreset_ratio": 0.1,
      "coreset_max_rows": 50_000,
      "flow": flow_config(),
      "mask_ratio": 0.25,
      "scoring": "entropy",
      "mask_ratios": "",
      "reconstructor": "",
      "train": train_config(),
      "checkpoint_every": 200,
      "keep_checkpoints": 2,
      "log_every": 10,
    }
  )


def parse_ratios(text: str) -> dict[str, float]:
  """'bottle=0.3, cable=0.2' -> {'bottle': 0.3, 'cable': 0.2}.

  Raises:
    ValueError: an entry that is not `name=number`.
  """
  ratios = {}
  for entry in (e.strip() for e in str(text or "").split(",")):
    if not entry:
      continue
    name, sep, value = entry.partition("=")
    try:
      if not sep or not name.strip():
        raise ValueError
      ratios[name.strip()] = float(value)
    except ValueError:
      raise ValueError(f"{entry!r} is not name=number") from None
  return ratios


def use_smoke_test_sizes(section: ml_collections.ConfigDict) -> None:
  """`section` (a `pmad_config`) set to the smoke-test sizes: the tiny reconstructor (4 x
  4 patches of 32 px) predicting codes of a 16-code codebook of a random tiny
  WideResNet's features, 2 training steps, a small flow."""
  section.variant, section.image_size = "test", 32
  section.target, section.codebook_size = "codebook", 16
  section.features.backbone, section.features.checkpoint = "test_wide", "random"
  section.flow.update(couplings=2, hidden=16, steps=20, batch_size=64, projection_dim=8)
  section.train.update(steps=2, batch_size=8, warmup_steps=1)
  section.checkpoint_every = 2

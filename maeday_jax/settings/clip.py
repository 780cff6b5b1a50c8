"""The text-prompted CLIP detectors (`detectors.clip_zero_shot`, `detectors.april_gan`):
the `clip` and `april_gan` sections. Light: imports nothing but `ml_collections` (see
`maeday_jax.settings`).
"""

from __future__ import annotations

import ml_collections

from maeday_jax.settings.data import training_source


def clip_section() -> ml_collections.ConfigDict:
  """The CLIP that the text-prompted detectors (`clip_zero_shot`, `april_gan`) use.

  Fields:
    backbone: `models.load` name: clip_vit_b16, clip_vit_l14, clip_vit_l14_336 (clip_test
      for smoke tests).
    checkpoint: '' (the backbone's public weights), a file, a Hugging Face folder, or
      'random'.
    image_size: the square input (a multiple of the patch size; APRIL-GAN: 518 with
      ViT-L/14-336, the position table resized as open_clip does).
    layers: the image blocks whose patch tokens make the maps (0-based; APRIL-GAN's
      ViT-L/14: 5, 11, 17, 23, the outputs of blocks 6, 12, 18, 24).
    class_name: the object named in the prompts ("object" when unknown).
  """
  return ml_collections.ConfigDict(
    {
      "backbone": "clip_vit_l14_336",
      "checkpoint": "",
      "image_size": 518,
      "layers": (5, 11, 17, 23),
      "class_name": "object",
    }
  )


def april_gan_section() -> ml_collections.ConfigDict:
  """APRIL-GAN's training and few-shot settings (CLIP's are the `clip` section).

  Fields:
    aux_data: the auxiliary data source with masks the adapters train on (a data section
      plus `splits`, default VisA's 'test': the recipe for evaluating MVTec AD); name ''
      stands for the evaluated dataset's own test split (smoke tests: not zero-shot).
    allow_same_dataset: train on the evaluated dataset anyway (not zero-shot any more).
    epochs, steps: passes over the aux data (released recipe: 15 on VisA, 3 on MVTec AD);
      steps > 0 overrides epochs.
    batch_size, lr, betas: Adam's (the released code: 64, 1e-3, (0.5, 0.999)).
    few_shot: also build memory banks from the fit's shots (`--config.shots=k`).
    chunk_size: bank rows per step of the nearest-neighbour search.
    log_every: training steps between loss lines.
    mosaic_prob: probability that a training sample becomes a 2 x 2 mosaic of four images
      of its category (and their masks) shrunk to the input size; -1 (default) = the
      method's rule: 0.2 when aux_data is mvtec_ad, else 0 (never on VisA).
    checkpoint_every: training steps between resumable Orbax checkpoints of the adapters
      in the fit's work directory (`<workdir>/training/april_gan/checkpoints`; a rerun
      resumes); 0 = none.
  """
  return ml_collections.ConfigDict(
    {
      "aux_data": training_source("test", name="visa"),
      "allow_same_dataset": False,
      "epochs": 15,
      "steps": 0,
      "batch_size": 64,
      "lr": 1e-3,
      "betas": (0.5, 0.999),
      "few_shot": False,
      "chunk_size": 4096,
      "log_every": 50,
      "mosaic_prob": -1.0,
      "checkpoint_every": 100,
    }
  )

"""MALA: the MAE turned into a direct defect segmenter, trained on normal images only.

Stage 1 trains (or continues) an MAE on the normal images of every selected category at
once, with MALA's loss `L1 + (1 - SSIM) + 0.1 * CE` (the CE of a pseudo-label predictor
that learns to tell originals from reconstructions). Stage 2 freezes the encoder and
trains the decoder plus the Token Balance Module to output a two-channel defect map for
images carrying synthetic defects (Perlin masks filled with a foreign texture: other
normal images, procedural textures, or a texture folder such as DTD). Scoring: the map's
defect channel, the image score the max of its 16 x 16 average pooling.

  python -m maeday_jax.main --config=configs/mala.py --workdir=runs/mala \
      --config.data.name=mvtec_ad --config.data.path=/data/mvtec_anomaly_detection
  # stage 1 from any MAE (e.g. one trained by configs/pretrain.py), 10 more epochs:
  ... --config.model.checkpoint=runs/pretrain/model --config.stage1.epochs=10
  # stage 1 off: stage 2 directly on that MAE
  ... --config.stage1.epochs=0
  # parts of the stage-1 loss off (to measure them): --config.stage1.adversarial_weight=0,
  # --config.stage1.ssim_weight=0, the official recipe: --config.stage1.pixel_loss=mse
  # object categories: --config.stage2.synthetic.foreground=True
  # DTD textures: --config.stage2.synthetic.textures=folder,procedural \
  #     --config.stage2.synthetic.texture_dir=/data/dtd/images

The test images are `eval.data` (by default the training source's `test` split). Running
the same command again resumes the stage that was interrupted. Fields and defaults:
`maeday_jax.defaults.mala_config`; `configs/mala.py:runlocal` is a smoke test.
"""

import ml_collections

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = defaults.mala_config(arg)
  # Evaluate on the same source as training unless told otherwise.
  config.eval.data.name = config.data.get_ref("name")
  config.eval.data.path = config.data.get_ref("path")
  config.eval.data.categories = config.data.get_ref("categories")
  return config

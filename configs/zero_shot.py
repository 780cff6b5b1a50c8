"""Zero-shot MAEDAY: score images by MAE reconstruction error under 32 random masks.

The default reproduces the paper's zero-shot MVTec AD run (all 15 categories, ViT-L,
32 masks, mask ratio 0.75):

  python -m maeday_jax.main --config configs/zero_shot.py --workdir runs/zero_shot

Your own folder of images (optionally with normal references and masks):

  python -m maeday_jax.main --config configs/zero_shot.py --workdir runs/line3 \
    --config.data.name=folder --config.data.path=/photos/line3 \
    --config.data.mask_path=/photos/line3_masks

Other useful overrides: --config.model.checkpoint=/path/mae_visualize_vit_large.pth,
--config.data.categories=bottle,carpet, --config.num_masks=16, --config.batch_size=32,
--config.model.dtype=bfloat16 (accelerators).

`configs/zero_shot.py:runlocal` shrinks everything for a quick check on a CPU: the tiny
random-weight `test` model (maps are meaningless), 4 masks, small batches.

Threshold (for predicted labels/masks in scores.csv and the panels), `threshold.method`:
  auto       F1-optimal on the test labels when both classes are labelled; else the
             percentile of scores on normal references when `data.normal_path` is set;
             else none.
  f1         F1-optimal on the labelled test images (the field's F1-max operating point).
  percentile `threshold.percentile` (default 99) of the scores of the normal references
             (the dataset's `train` split, or `data.normal_path` for folders).
  fixed      `threshold.value`.
  none       scores and maps only.
"""

import ml_collections

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The fields and their defaults: `maeday_jax.defaults.zero_shot_config`."""
  return defaults.zero_shot_config(arg)

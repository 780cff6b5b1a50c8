"""Evaluate any detector on a dataset: metrics, per-image scores, pictures, reports.

  python -m maeday_jax.main --config configs/evaluate.py \
    --config.detector=runs/line3_pc/detector --config.data.name=folder \
    --config.data.path=/line3/test --workdir runs/line3_eval

`--config.detector`: a fitted artifact folder (from `configs/fit.py`), or a zero-shot
method by name (`maeday`, read from this config's `model`, `num_masks`, ... sections).
Data, thresholds and outputs as in `configs/zero_shot.py`. `:runlocal`: tiny models.
"""

import ml_collections

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return defaults.evaluate_config(arg)

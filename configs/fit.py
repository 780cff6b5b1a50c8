"""Fit any detector on normal images and save it as an artifact (`<workdir>/detector/`).

  python -m maeday_jax.main --config configs/fit.py --config.detector=patchcore \
    --config.data.name=folder --config.data.path=/line3/test \
    --config.data.normal_path=/line3/good --config.shots=4 --workdir runs/line3_pc

`--config.detector`: maeday, maeday_lora, maeday_full, mae, patchcore, patchcore_x2, mala,
ensemble (with `--config.members=maeday_lora,patchcore`). `--config.shots=k` fits on k
normal training images chosen by `--config.seed`, `0` on all of them; up to
`--config.heldout_normals` others give the normal statistics (and a percentile
threshold, `--config.threshold.method=percentile`). Each method reads its own sections
(`model`, `num_masks`, `train`, `patchcore`, `ensemble`, `pretrain`, `mala`; see
`maeday_jax/detectors/`). `:runlocal`: every method on its tiny random-weight model.
"""

import ml_collections

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return defaults.fit_config(arg)

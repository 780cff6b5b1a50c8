"""Export a fitted detector (or a zero-shot method by name) as StableHLO.

  python -m maeday_jax.main --config configs/export.py \
    --config.detector=runs/line3_pc/detector --config.platforms=cpu,cuda \
    --workdir runs/line3_export

`platforms`: comma-separated among cpu, cuda, rocm, tpu. Load it with
`maeday_jax.exported.load("<workdir>/exported").score(images)`. `:runlocal`: tiny models.
"""

import ml_collections

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = defaults.evaluate_config(arg)
  config.job = "export"
  config.format = "stablehlo"
  config.platforms = "cpu"
  return config

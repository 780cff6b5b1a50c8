"""Export a fitted detector (or a zero-shot method by name) as StableHLO or ONNX.

  python -m maeday_jax.main --config configs/export.py \
    --config.detector=runs/line3_pc/detector --config.platforms=cpu,cuda \
    --workdir runs/line3_export

`format`: `stablehlo` (runs with JAX alone) or `onnx` (jax2onnx, checked in onnxruntime;
needs `pip install -e ".[export]"`; MAEDAY's masks are declared inputs). `platforms`
(StableHLO): comma-separated among cpu, cuda, rocm, tpu; an ONNX export's masks module is
lowered for all of them. Load either with
`maeday_jax.exported.load("<workdir>/exported").score(images)`. `:runlocal`: tiny models.
"""

import ml_collections

from maeday_jax import defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = defaults.evaluate_config(arg)
  config.job = "export"
  config.format = "stablehlo"  # or "onnx"
  config.platforms = "cpu"
  return config

"""The export job: a fitted detector as a StableHLO module that runs with JAX alone, or as
ONNX checked in onnxruntime.

    python -m maeday_jax.main --config configs/export.py \
      --config.detector=runs/line3_pc/detector --config.platforms=cpu,cuda \
      --workdir runs/line3_export

Writes `<workdir>/exported/` (`maeday_jax.exporting`, `--config.format=onnx`:
`maeday_jax.exporting_onnx`, the `export` extra); load either anywhere with
`maeday_jax.exported.load(path).score(images)`. An ONNX file is kept only when onnxruntime
scores like the JAX detector; otherwise the job fails naming the detector and the
primitive or operator, and writes nothing.
"""

from __future__ import annotations

import ml_collections

from maeday_jax import exporting, exporting_onnx
from maeday_jax.config_errors import ConfigError
from maeday_jax.jobs import common, detector_choice

EXPORT_DIR = "exported"
FORMATS = ("stablehlo", "onnx")


def _platforms(value) -> tuple[str, ...]:
  names = value.split(",") if isinstance(value, str) else list(value)
  return tuple(n.strip() for n in names if n.strip())


def validate(config: ml_collections.ConfigDict) -> str:
  """Checks the detector (first), the format and the platforms; returns the spec."""
  spec = detector_choice.check(config)
  common.require(
    config.format in FORMATS,
    "format",
    f"{config.format!r} is not one of {', '.join(FORMATS)}.",
  )
  if config.format == "onnx":
    try:
      exporting_onnx.require_extra()
    except exporting_onnx.OnnxExportError as e:
      raise ConfigError(f"--config.format=onnx: {e}") from e
  platforms = _platforms(config.platforms)
  unknown = sorted(set(platforms) - set(exporting.PLATFORMS))
  common.require(
    bool(platforms) and not unknown,
    "platforms",
    f"{', '.join(unknown) or 'nothing'}: give a comma-separated subset of "
    f"{', '.join(exporting.PLATFORMS)}.",
  )
  return spec


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Exports the detector into `<workdir>/exported/`; returns its manifest."""
  spec = validate(config)
  workdir = common.prepare_workdir(workdir, config)
  # onnxruntime runs no bfloat16 convolutions: an ONNX file computes in float32 whatever
  # the detector was fitted with (its weights are float32 anyway).
  onnx = config.format == "onnx"
  detector = detector_choice.load(config, spec, "export", "float32" if onnx else None)
  if onnx:
    try:
      path = exporting_onnx.export_onnx(detector, workdir / EXPORT_DIR)
    except exporting_onnx.OnnxExportError as e:
      raise exporting_onnx.OnnxExportError(f"--config.format=onnx: {e}") from e
    print(f"Exported {detector.describe()} to {path} (ONNX, checked in onnxruntime).")
    return {"path": str(path), "method": detector.method}
  path = exporting.export_stablehlo(
    detector, workdir / EXPORT_DIR, platforms=_platforms(config.platforms)
  )
  print(f"Exported {detector.describe()} to {path} (StableHLO, {config.platforms}).")
  return {"path": str(path), "method": detector.method}

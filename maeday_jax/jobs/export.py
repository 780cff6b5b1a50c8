"""The export job: a fitted detector as a StableHLO module that runs with JAX alone.

    python -m maeday_jax.main --config configs/export.py \
      --config.detector=runs/line3_pc/detector --config.platforms=cpu,cuda \
      --workdir runs/line3_export

Writes `<workdir>/exported/` (`maeday_jax.exporting`); load it anywhere with
`maeday_jax.exported.load(path).score(images)`. `--config.format=onnx` is not available
yet (it is refused with that reason, never written half-converted).
"""

from __future__ import annotations

import ml_collections

from maeday_jax import exporting
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
  common.require(
    config.format != "onnx",
    "format",
    "ONNX export is not available in this version; export StableHLO "
    "(--config.format=stablehlo), which runs with JAX alone on cpu, cuda, rocm and tpu.",
  )
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
  detector = detector_choice.load(config, spec, "export")
  path = exporting.export_stablehlo(
    detector, workdir / EXPORT_DIR, platforms=_platforms(config.platforms)
  )
  print(f"Exported {detector.describe()} to {path} (StableHLO, {config.platforms}).")
  return {"path": str(path), "method": detector.method}

"""The evaluate job: score a dataset's test images with any detector, then report.

    python -m maeday_jax.main --config configs/evaluate.py \
      --config.detector=runs/line3_pc/detector --config.data.name=folder \
      --config.data.path=/line3/test --workdir runs/line3_eval

`--config.detector` is a fitted artifact (a `detector/` folder written by the fit job:
the artifact decides the model and its settings) or a zero-shot method by name
(`maeday`, built from this config's sections). The outputs are those of the zero-shot
job: scores.csv, maps, overlays, panels, ROC curves, metrics.json / metrics.md (every
metric that the labels do not define is marked undefined with the reason).
"""

from __future__ import annotations

import jax
import ml_collections

from maeday_jax import data
from maeday_jax.jobs import common, detector_choice, run_report


def validate(config: ml_collections.ConfigDict) -> str:
  """Checks the detector (first) and the scoring settings; returns the detector spec."""
  spec = detector_choice.check(config)
  common.validate_scoring(config)
  return spec


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Scores every configured category with the detector; returns the summary."""
  spec = validate(config)
  categories = data.resolve_categories(config.data)  # Early error for a bad path/category.
  workdir = common.prepare_workdir(workdir, config)
  detector = detector_choice.load(config, spec, "evaluate")
  scoring = detector_choice.scoring(detector, config)
  # The paper's table to compare with: few-shot when the detector learned from shots.
  setting = "few_shot" if detector.fit_record.get("shots") else "zero_shot"
  summary, outcomes = run_report.evaluate_categories(
    scoring, config, workdir, categories, setting, method=detector.method
  )
  summary["detector"] = {
    "spec": spec,
    "method": detector.method,
    "description": detector.describe(),
  }
  if jax.process_index() == 0:
    run_report.print_closing_summary(summary, outcomes, workdir)
  return summary

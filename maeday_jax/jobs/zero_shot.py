"""The zero-shot recipe: the paper's zero-shot MAEDAY table, i.e. the evaluation of the
`maeday` detector (built from this config's `model`, `num_masks`, ... sections) on every
category.

    python -m maeday_jax.main --config configs/zero_shot.py --workdir runs/zero_shot

Outputs under the work directory:
  scores.csv                 file, category, label, score (and predicted label)
  maps/<category>/...npz     pixel maps at each image's own resolution (key `map`)
  overlays/<category>/...png heatmap overlays; panels/<category>/...png for a sample
  reconstructions/<category>/...png  masked inputs and their reconstructions
  roc/<category>.png         image ROC curves (labelled data)
  metrics.json, metrics.md   metrics per category and means (when labels exist)
  config.json                the resolved configuration
"""

import jax
import ml_collections

from maeday_jax import data
from maeday_jax.jobs import common, detector_choice, run_report


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs zero-shot scoring for every configured category; returns the summary dict."""
  common.validate_scoring(config)
  categories = data.resolve_categories(config.data)  # Early error for a bad path/category.
  workdir = common.prepare_workdir(workdir, config)
  detector = detector_choice.load(config, "maeday", "zero_shot")
  scoring = detector_choice.scoring(detector, config)
  common.describe_model(detector.model, scoring.mesh, categories)

  summary, outcomes = run_report.evaluate_categories(
    scoring, config, workdir, categories, "zero_shot"
  )
  if jax.process_index() == 0:
    run_report.print_closing_summary(summary, outcomes, workdir)
  return summary

"""The zero-shot job: score every test image of every category, then evaluate and report.

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

from maeday_jax import data, evaluation, reports
from maeday_jax.jobs import common, run_report
from maeday_jax.jobs.category_run import run_category


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs zero-shot scoring for every configured category; returns the summary dict."""
  common.validate_scoring(config)
  categories = data.resolve_categories(config.data)  # Early error for a bad path/category.
  workdir = common.prepare_workdir(workdir, config)
  model, params = common.load_model(config.model, config.seed)
  scoring = evaluation.Scoring.from_config(model, params, config)
  common.describe_model(model, scoring.mesh, categories)

  outcomes = {}
  for category in categories:
    outcomes[category] = run_category(scoring, category, config, workdir)
    # Each finished category is on disk at once: a later error or a kill loses none.
    summary = run_report.summarize_outcomes(outcomes, config.data.name)
    if jax.process_index() == 0:
      run_report.write_scores(workdir, outcomes)
      reports.write_metrics_json(workdir / "metrics.json", summary)
      reports.write_markdown_table(workdir / "metrics.md", summary, config.data.name, "zero_shot")
  if jax.process_index() == 0:
    run_report.print_closing_summary(summary, outcomes, workdir)
  return summary

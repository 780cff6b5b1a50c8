"""What the recipes that train and then test share: the test images of a recipe config,
scoring a fitted detector on every test category, and the comparison table.

A recipe config (`configs/mala.py`, `configs/pmad.py`) has `data` (the training source)
and `eval` (`eval.data`, batch_size, eval_size, eval_original_max_side, mask_ratio,
threshold, outputs).
"""

from __future__ import annotations

import pathlib

import ml_collections

from maeday_jax import data, defaults, evaluation, reports
from maeday_jax.jobs import run_report

SHOWN = ("image_auroc", "pixel_auroc", "aupro")
# The `data` fields the test images share with the training source (`eval_data`).
_SHARED_DATA_FIELDS = ("mask_path", "normal_path", "data_dir", "num_workers", "prefetch")


def eval_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The test images (`eval.data`), completed from the training source when they are
  the same source (name and path): the fields set on `data` (where the folder examples
  set `mask_path` and `normal_path`) and left at their defaults on `eval.data` apply to
  the evaluation too. Without this, `--config.data.mask_path` gave no pixel metrics."""
  test = ml_collections.ConfigDict(config.eval.data.to_dict())
  if (test.name, test.path) == (config.data.name, config.data.path):
    default = defaults.data_config()
    for field in _SHARED_DATA_FIELDS:
      unset = test.get(field, default.get(field)) == default.get(field)
      if unset and config.data.get(field, default.get(field)) != default.get(field):
        test[field] = config.data[field]
  return test


def evaluate(scoring: evaluation.Scoring, config, workdir: pathlib.Path, categories=None):
  """Scores the test categories (`categories`, default every one of `eval.data`) with one
  detector into `workdir`; returns the summary (`per_category` metrics, means)."""
  scoring_config = defaults.zero_shot_config()
  scoring_config.data = eval_data(config)
  scoring_config.mask_ratio = config.eval.get("mask_ratio", scoring_config.mask_ratio)
  scoring_config.threshold = config.eval.threshold
  scoring_config.outputs = config.eval.outputs
  workdir.mkdir(parents=True, exist_ok=True)
  if categories is None:
    categories = data.resolve_categories(scoring_config.data)
  summary, _ = run_report.evaluate_categories(
    scoring, scoring_config, workdir, categories, "zero_shot"
  )
  return summary


def scoring(detector, config) -> evaluation.Scoring:
  """How a recipe scores its test images with `detector` (`config.eval`)."""
  return evaluation.Scoring.for_detector(
    detector,
    batch_size=config.eval.batch_size,
    eval_size=config.eval.eval_size or None,
    eval_original_max_side=int(config.eval.get("eval_original_max_side") or 0),
  )


def comparison_table(summaries: dict[str, dict]) -> str:
  """A markdown table of every method's image AUROC, pixel AUROC and AUPRO per category."""
  lines = [
    "| method | category | image AUROC | pixel AUROC | AUPRO |",
    "| --- | --- | --- | --- | --- |",
  ]
  for method, summary in summaries.items():
    for category, metrics in summary["per_category"].items():
      cells = [reports.format_value(metrics.get(name)) for name in SHOWN]
      lines.append(f"| {method} | {category} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"

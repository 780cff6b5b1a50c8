"""Evaluation results as files people read: metrics.json, a Markdown table, a per-image CSV.

The flow for one run: build a `CategoryResult` per category, `category_metrics` each,
`summarize` them (group means: objects / textures / all for MVTec AD), then write with
`write_metrics_json`, `write_markdown_table` and `write_scores_csv`. A few-shot run repeats
that per seed and combines the summaries with `summarize_seeds` (mean ± std over seeds).

The parts, each in its module: results and summaries in `maeday_jax.summaries`, the text
and Markdown tables in `maeday_jax.report_tables`, the files here. Their public names are
all importable from here (`reports.summarize`, `reports.markdown_table`, ...).

A metric that is undefined for a category (one class only, no masks) is `None` (`null` in
JSON) and its reason goes to that category's `notes`; group means are taken over the
categories where the metric is defined, and say so in the group's `notes`.

Every file is written atomically (`atomic_files`): complete, or not at all.
"""

from __future__ import annotations

import csv
import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from maeday_jax import atomic_files
from maeday_jax.report_tables import (
  METHOD_PAPER_ROWS,
  METHOD_TITLES,
  METRIC_TITLES,
  format_summary_table,
  format_value,
  markdown_table,
  methods_markdown_table,
  vand_summary,
)
from maeday_jax.summaries import (
  METRIC_NAMES,
  SUMMARY_METRICS,
  CategoryResult,
  category_groups,
  category_metrics,
  ordered_categories,
  summarize,
  summarize_seeds,
)
from maeday_jax.thresholds import Threshold

# The public names, with those that moved to `summaries` and `report_tables` (kept
# importable from here for existing callers).
__all__ = [
  "METHOD_PAPER_ROWS",
  "METHOD_TITLES",
  "METRIC_NAMES",
  "METRIC_TITLES",
  "SUMMARY_METRICS",
  "CategoryResult",
  "category_groups",
  "category_metrics",
  "format_summary_table",
  "format_value",
  "markdown_table",
  "methods_markdown_table",
  "ordered_categories",
  "spreadsheet_safe",
  "summarize",
  "summarize_seeds",
  "vand_summary",
  "write_markdown_table",
  "write_metrics_json",
  "write_scores_csv",
]


def _jsonable(value):
  """NumPy scalars/arrays to Python; NaN to None so the JSON is strict."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, Threshold):
    return value.to_dict()
  return value


def write_metrics_json(path, summary: Mapping) -> pathlib.Path:
  """Writes the summary (from `summarize` or `summarize_seeds`) as strict JSON."""
  text = json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n"
  return atomic_files.write_text(path, text)


def write_markdown_table(
  path,
  summary: Mapping,
  dataset: str,
  setting: str = "zero_shot",
  paper_row: str | None = None,
  shots: int | None = None,
  method: str | None = None,
) -> pathlib.Path:
  """Writes a table shaped like the paper's Tables 1-2, with the paper's numbers for MVTec AD.

  `paper_row` picks another row of `paper_numbers.SUMMARY_ROWS` to compare with (e.g.
  "maeday_patchcore_ensemble"); by default zero-shot compares with MAEDAY 0-shot and
  few-shot with MAEDAY 1-shot (LoRA); `method` (the detector's) compares with its own
  published figures where `paper_numbers.METHOD_ROWS` has them (april_gan). The VAND
  summary follows the table (`report_tables.vand_summary`).
  """
  text = markdown_table(summary, dataset, setting, paper_row, shots, method)
  return atomic_files.write_text(path, text)


def _threshold_for(threshold, category: str) -> float | None:
  if threshold is None:
    return None
  if isinstance(threshold, Mapping):
    threshold = threshold.get(category)
    if threshold is None:
      return None
  return float(threshold.value if isinstance(threshold, Threshold) else threshold)


# Leading characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection).
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text) -> str:
  """`str(text)`, with a `'` in front when a spreadsheet would otherwise run it as a formula."""
  text = str(text)
  return "'" + text if text.startswith(_FORMULA_STARTS) else text


def write_scores_csv(
  path,
  results: Sequence[CategoryResult],
  threshold: Threshold | float | Mapping[str, Threshold | float] | None = None,
) -> pathlib.Path:
  """Per-image CSV: file, category, label, score[, predicted_label][, seed].

  `threshold` is one threshold for all categories or one per category (a mapping); the
  `predicted_label` column (1 where `score >= threshold`) is written when one is given and
  left empty for categories without one. A `seed` column is added for few-shot results.

  Text cells (`file`, `category`) that begin with `=`, `+`, `-`, `@`, a tab or a carriage
  return get a single quote in front (`=x.png` is written `'=x.png`), as OWASP recommends
  against CSV injection, so a spreadsheet shows them as text instead of running them as
  formulas. To read the original name back, drop the `'` of a cell that starts with `'`
  followed by one of those characters. Numbers (`label`, `score`, ...) are written as they
  are: a score of -1.5 stays `-1.5`. The file is written atomically (complete or not at all).
  """
  with_seed = any(r.seed is not None for r in results)
  columns = ["file", "category", "label", "score"]
  columns += ["predicted_label"] if threshold is not None else []
  columns += ["seed"] if with_seed else []
  path = pathlib.Path(path)
  with (
    atomic_files.replace_when_done(path) as tmp,
    open(tmp, "x", newline="", encoding="utf-8") as f,
  ):
    writer = csv.writer(f)
    writer.writerow(columns)
    for result in results:
      value = _threshold_for(threshold, result.category)
      category = spreadsheet_safe(result.category)
      for name, label, score in zip(result.file_names, result.labels, result.scores, strict=True):
        row = [spreadsheet_safe(name), category, int(label), repr(float(score))]
        if threshold is not None:
          row.append("" if value is None else int(score >= value))
        if with_seed:
          row.append("" if result.seed is None else result.seed)
        writer.writerow(row)
  return path

"""The files and console summary of a scoring run, from its categories' outcomes."""

from __future__ import annotations

from maeday_jax import data, reports
from maeday_jax.jobs.category_run import CategoryOutcome, run_category


def summarize_outcomes(outcomes: dict[str, CategoryOutcome], dataset: str, seed=None) -> dict:
  """The report summary of per-category outcomes, with thresholds, timing and skips."""
  summary = reports.summarize({c: o.metrics for c, o in outcomes.items()}, dataset, seed=seed)
  summary["thresholds"] = {c: o.notes for c, o in outcomes.items()}
  summary["timing"] = {c: o.timing for c, o in outcomes.items()}
  summary["skipped"] = [
    {"split": str(s), "path": p, "reason": r}
    for o in outcomes.values()
    for s in o.splits
    for p, r in s.skipped
  ]
  # Images of a folder with masks that had no mask of their own: scored as normal.
  unmasked = {str(s): s.unmasked for o in outcomes.values() for s in o.splits if s.unmasked}
  if unmasked:
    summary["unmasked"] = unmasked
  return summary


def write_scores(workdir, outcomes: dict[str, CategoryOutcome]) -> None:
  """scores.csv with predicted labels where a category has a threshold."""
  reports.write_scores_csv(
    workdir / "scores.csv",
    [o.result for o in outcomes.values()],
    threshold={c: o.threshold for c, o in outcomes.items() if o.threshold is not None},
  )


def print_closing_summary(summary: dict, outcomes: dict[str, CategoryOutcome], workdir) -> None:
  print(reports.format_summary_table(summary))
  skipped = data.skipped_summary([s for o in outcomes.values() for s in o.splits])
  if skipped:
    print("\nSkipped files (see metrics.json):\n" + skipped)
  if unmasked := summary.get("unmasked"):
    counts = ", ".join(f"{split}: {count}" for split, count in unmasked.items())
    print(f"\nImages without a mask, scored as normal (label 0): {counts}")
  total = sum(o.timing["images"] for o in outcomes.values())
  seconds = sum(o.timing["seconds"] for o in outcomes.values())
  print(f"\nScored {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.2f} img/s).")
  print(f"Outputs in {workdir}")


def evaluate_categories(scoring, config, workdir, categories, kind: str, seed=None) -> tuple:
  """Scores every category's test split with `scoring` into `workdir` (scores.csv,
  maps, pictures, metrics.json / metrics.md rewritten after each category, so a later
  error or a kill loses none); returns (summary, outcomes). `kind`: the table's title
  ('zero_shot', 'evaluate', ...)."""
  import jax

  outcomes = {}
  summary: dict = {}
  for category in categories:
    outcomes[category] = run_category(scoring, category, config, workdir, seed=seed)
    summary = summarize_outcomes(outcomes, config.data.name, seed=seed)
    if jax.process_index() == 0:
      write_scores(workdir, outcomes)
      reports.write_metrics_json(workdir / "metrics.json", summary)
      reports.write_markdown_table(workdir / "metrics.md", summary, config.data.name, kind)
  return summary, outcomes

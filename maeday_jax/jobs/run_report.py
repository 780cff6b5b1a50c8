"""The files and console summary of a scoring run, from its categories' outcomes."""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from maeday_jax import data, html_report, pictures, reports
from maeday_jax.jobs.category_run import CategoryOutcome, color_range, run_category
from maeday_jax.jobs.outputs import output_path

log = logging.getLogger("maeday_jax")


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


def page_run(
  outcome: CategoryOutcome,
  out_dir,
  method: str | None = None,
  gallery_size: int | None = html_report.GALLERY_SIZE,
) -> html_report.CategoryRun:
  """One category's outcome as report.html shows it, with its gallery: the worst false
  positives and negatives (`html_report.worst_cases`), drawn from the split's images and
  the maps under `out_dir` on the category's colour scale (process 0). `gallery_size`
  None (or an outcome without its split): no gallery. A picture that cannot be drawn is
  left out (logged)."""
  result, threshold = outcome.result, outcome.threshold
  run = html_report.CategoryRun(result, threshold, outcome.notes.get("threshold", ""), method)
  if gallery_size is None or not outcome.splits:  # No split: no images to draw.
    return run
  worst = html_report.worst_cases(result, threshold, gallery_size)
  split = outcome.splits[0]
  # Result positions follow every process's gathered order, not the split's: by name.
  wanted = {result.file_names[p] for positions in worst for p in positions.tolist()}
  where = {n: i for i in range(len(split)) if (n := split.file_name(i)) in wanted}
  vmin, vmax = color_range(result.scores, threshold)

  def draw(position: int) -> html_report.GalleryImage | None:
    name = result.file_names[position]
    try:
      example = split[where[name]]
      with np.load(output_path(out_dir, "maps", result.category, name, ".npz")) as f:
        anomaly_map = f["map"]
      mask = example["mask"] if example["label"] == 1 else None
      png = pictures.overlay_png(
        example["image"], anomaly_map, vmin, vmax, mask, html_report.GALLERY_SIDE
      )
    except (OSError, KeyError, ValueError) as e:  # One picture must not stop the report.
      log.warning("report.html: could not draw %s: %s", name, e)
      return None
    return html_report.GalleryImage(
      name, float(result.scores[position]), int(result.labels[position]), png
    )

  run.false_positives, run.false_negatives = (
    [item for item in map(draw, positions.tolist()) if item is not None] for positions in worst
  )
  return run


def write_page(workdir, setting: str, dataset: str, summaries: dict, runs: list) -> None:
  """`<workdir>/report.html` (see `maeday_jax.html_report`), titled by the work directory."""
  title = f"maeday_jax report: {pathlib.Path(workdir).name}"
  html_report.write_page(workdir / "report.html", title, dataset, setting, summaries, runs)


def evaluate_categories(
  scoring, config, workdir, categories, kind: str, seed=None, method: str | None = None
) -> tuple:
  """Scores every category's test split with `scoring` into `workdir` (scores.csv,
  maps, pictures, metrics.json / metrics.md / report.html rewritten after each category,
  so a later error or a kill loses none); returns (summary, outcomes). `kind`: the
  paper's setting the tables compare with ('zero_shot' or 'few_shot'); `method`: the
  detector's, for its own published figures where the tables have them (april_gan)."""
  import jax

  outcomes = {}
  summary: dict = {}
  page_runs = []  # Each category's gallery is drawn once, the page rewritten each time.
  for category in categories:
    outcomes[category] = run_category(scoring, category, config, workdir, seed=seed)
    summary = summarize_outcomes(outcomes, config.data.name, seed=seed)
    if jax.process_index() == 0:
      write_scores(workdir, outcomes)
      reports.write_metrics_json(workdir / "metrics.json", summary)
      reports.write_markdown_table(
        workdir / "metrics.md", summary, config.data.name, kind, method=method
      )
      page_runs.append(page_run(outcomes[category], workdir))
      write_page(workdir, kind, config.data.name, {None: summary}, page_runs)
  return summary, outcomes

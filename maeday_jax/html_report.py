"""report.html: one self-contained page per evaluation run, readable in any browser offline.

What it shows: the metrics table per category and method, with the paper's numbers beside
ours for MVTec AD; per category the image ROC and PR curves, each run's threshold with its
confusion counts (TP / FP / TN / FN at that threshold, or "no threshold"), and a gallery
of the worst false positives and false negatives (heatmap overlays with their scores). A
metric the labels leave undefined reads "n/a", with the reason as a tooltip and a footnote.

Self-contained: the CSS is inline, pictures are `data:` URIs, charts are inline SVG, there
is no script, and a Content-Security-Policy tells the browser to load nothing else; the
only links are plain ones to the paper. Every value is HTML-escaped: category and file
names come from users.

Bounded for large runs: the gallery holds at most `GALLERY_SIZE` false positives and as
many false negatives per category and run (each picture at most `GALLERY_SIDE` pixels,
about 100 kB of PNG for a photograph: 1 to 2 MB per category; a few-shot run shares them
out among its methods and draws only its first seed's), and each curve at most
`html_charts.MAX_CURVE_POINTS` points, so the page grows with the categories and methods,
not with the images.

The jobs gather the pictures (`maeday_jax.jobs.run_report`); `write_page` lays out the
page and writes it atomically (a rerun replaces it). The metrics table is built in
`maeday_jax.html_tables`, the charts, pictures and escaping in `maeday_jax.html_charts`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from maeday_jax import atomic_files, html_tables
from maeday_jax.categories import canonical_dataset
from maeday_jax.html_charts import (
  DASHES,
  PALETTE,
  Line,
  escape,
  image_curves,
  png_data_uri,
  svg_chart,
)
from maeday_jax.report_tables import METHOD_TITLES
from maeday_jax.summaries import CategoryResult
from maeday_jax.thresholds import Threshold

GALLERY_SIZE = 6
GALLERY_SIDE = 256

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 7px}
td{text-align:right}td.text{text-align:left}th{background:#f0f0f0}tr.mean td{font-weight:600}
td.na{color:#888}td[title]{cursor:help}.paper{color:#555;background:#fafafa}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.chart text{font-size:11px;fill:#333}.chart text.title{font-size:13px;font-weight:600}
.chart .frame{fill:#fff;stroke:#999}.chart .grid{stroke:#eee}
.chart .chance{stroke:#bbb;stroke-dasharray:4 3}
ul.legend{list-style:none;padding:0}.swatch{display:inline-block;width:24px;margin-right:6px;
border-top-width:3px;vertical-align:middle}
.cases{display:flex;flex-wrap:wrap;gap:8px 40px}h4{margin:4px 0;font-weight:500}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:256px;font-size:12px}
figure img{display:block;width:256px;height:auto;max-height:256px;object-fit:contain;
image-rendering:pixelated;background:#eee}
figcaption{word-break:break-all}ol.notes{font-size:12px;color:#444}
"""


@dataclasses.dataclass(frozen=True)
class GalleryImage:
  """One picture of the gallery: a heatmap overlay as PNG bytes, with what it shows."""

  file_name: str
  score: float
  label: int
  png: bytes


@dataclasses.dataclass
class CategoryRun:
  """One category's outcome for one method (and seed), as the page shows it.

  Attributes:
    result: the scores and labels (`result.seed`: the few-shot seed, or None).
    threshold: the category's decision threshold, or None.
    threshold_note: how it was chosen, or why there is none.
    method: the few-shot method ("maeday", "patchcore", ...), None for a single detector.
    false_positives, false_negatives: the gallery (`worst_cases`), None when this run
      has no gallery (e.g. the other seeds of a few-shot run).
  """

  result: CategoryResult
  threshold: Threshold | None = None
  threshold_note: str = ""
  method: str | None = None
  false_positives: list[GalleryImage] | None = None
  false_negatives: list[GalleryImage] | None = None


def worst_cases(result: CategoryResult, threshold, count: int = GALLERY_SIZE) -> tuple:
  """Positions (into `result`) of the worst false positives and false negatives.

  With a threshold: normal images scored `>= threshold`, highest first, and anomalous
  images scored below it, lowest first. Without one: the highest-scoring normal and the
  lowest-scoring anomalous images (those a threshold would get wrong first). Unlabelled
  images are never shown. At most `count` of each.
  """
  scores, labels = result.scores, result.labels
  normal, anomalous = labels == 0, labels == 1
  if threshold is not None:
    value = float(getattr(threshold, "value", threshold))
    normal, anomalous = normal & (scores >= value), anomalous & (scores < value)
  fp, fn = np.flatnonzero(normal), np.flatnonzero(anomalous)
  fp = fp[np.argsort(-scores[fp], kind="stable")][:count]
  fn = fn[np.argsort(scores[fn], kind="stable")][:count]
  return fp, fn


def confusion_counts(result: CategoryResult, threshold) -> dict[str, int] | None:
  """TP / FP / TN / FN of the labelled images at `threshold` (`score >= value`), or None."""
  if threshold is None:
    return None
  labels = result.labels
  predicted = result.scores >= float(getattr(threshold, "value", threshold))
  return {
    "TP": int(np.sum(predicted & (labels == 1))),
    "FP": int(np.sum(predicted & (labels == 0))),
    "TN": int(np.sum(~predicted & (labels == 0))),
    "FN": int(np.sum(~predicted & (labels == 1))),
  }


def _run_label(run: CategoryRun) -> str:
  parts = [METHOD_TITLES.get(run.method, run.method)] if run.method else []
  parts += [f"seed {run.result.seed}"] if run.result.seed is not None else []
  return ", ".join(parts) or "this run"


def _curves_html(runs: Sequence[CategoryRun], methods: list) -> str:
  roc, pr, legend, undefined = [], [], [], []
  seeds = list(dict.fromkeys(r.result.seed for r in runs))
  for run in runs:
    curves = image_curves(run.result.scores, run.result.labels)
    label = _run_label(run)
    if curves.undefined:
      undefined.append(f"{label}: {curves.undefined}")
      continue
    colour = PALETTE[methods.index(run.method) % len(PALETTE)]
    dash = DASHES[seeds.index(run.result.seed) % len(DASHES)]
    roc.append(Line(curves.fpr, curves.tpr, label, colour, dash))
    pr.append(Line(curves.recall, curves.precision, label, colour, dash))
    style = f"border-top-color:{colour};border-top-style:{'dashed' if dash else 'solid'}"
    legend.append(
      f'<li><span class="swatch" style="{style}"></span>{escape(label)}: '
      f"AUROC {100 * curves.auroc:.1f} %, AP {100 * curves.ap:.1f} %</li>"
    )
  parts = []
  if roc:
    parts.append(
      '<div class="charts">'
      + svg_chart("ROC (images)", "false-positive rate", "true-positive rate", roc, True)
      + svg_chart("Precision-recall (images)", "recall", "precision", pr)
      + f'<ul class="legend">{"".join(legend)}</ul></div>'
    )
  parts += [f'<p class="na">ROC and PR undefined: {escape(u)}</p>' for u in undefined]
  return "".join(parts)


def _threshold_html(runs: Sequence[CategoryRun]) -> str:
  rows = ["<tr><th>Run</th><th>Threshold</th><th>How chosen</th>"
          "<th>TP</th><th>FP</th><th>TN</th><th>FN</th></tr>"]  # fmt: skip
  for run in runs:
    counts = confusion_counts(run.result, run.threshold)
    label = f'<td class="text">{escape(_run_label(run))}</td>'
    note = escape(run.threshold_note)
    if counts is None:
      rows.append(f'<tr>{label}<td class="text">no threshold</td><td class="text">{note}</td>'
                  '<td colspan="4" class="na">—</td></tr>')  # fmt: skip
      continue
    cells = "".join(f"<td>{counts[k]}</td>" for k in ("TP", "FP", "TN", "FN"))
    value = escape(f"{float(run.threshold.value):.6g}")
    how = escape(run.threshold.describe()) + (f"; {note}" if note else "")
    rows.append(f'<tr>{label}<td>{value}</td><td class="text">{how}</td>{cells}</tr>')
  return f"<h3>Threshold</h3><table>{''.join(rows)}</table>"


def _gallery_html(run: CategoryRun, several: bool) -> str:
  if run.false_positives is None and run.false_negatives is None:
    return ""
  of = f" — {escape(_run_label(run))}" if several else ""
  if run.threshold is None:
    title = "Hardest images (no threshold)"
    kinds = ("highest-scoring normal images", "lowest-scoring anomalous images")
  else:
    title = "Worst false positives and false negatives"
    kinds = ("false positives: normal, scored >= threshold, highest first",
             "false negatives: anomalous, scored below it, lowest first")  # fmt: skip
  columns = []
  for kind, images in zip(kinds, (run.false_positives, run.false_negatives), strict=True):
    figures = [
      f'<figure><img src="{png_data_uri(item.png)}" alt="{escape(item.file_name)}">'
      f"<figcaption>{escape(item.file_name)}<br>score {escape(f'{item.score:.5g}')}, "
      f"{'anomalous' if item.label == 1 else 'normal'}</figcaption></figure>"
      for item in images or ()
    ]
    body = f'<div class="gallery">{"".join(figures)}</div>' if figures else "<p>none</p>"
    columns.append(f"<div><h4>{escape(kind)}</h4>{body}</div>")
  return f'<h3>{title}{of}</h3><div class="cases">{"".join(columns)}</div>'


def render_page(
  title: str,
  dataset: str,
  setting: str,
  summaries: Mapping[str | None, Mapping],
  runs: Sequence[CategoryRun],
) -> str:
  """The HTML text of `write_page`."""
  footnotes = html_tables.Footnotes()
  table = html_tables.metrics_table(summaries, dataset, setting, footnotes)
  methods = list(summaries)
  several = len(methods) > 1 or len({r.result.seed for r in runs}) > 1
  by_category: dict[str, list[CategoryRun]] = {}
  for run in runs:
    by_category.setdefault(run.result.category, []).append(run)
  sections = []
  for category, category_runs in by_category.items():
    counts = category_runs[0].result.labels
    sizes = (
      f"{counts.size} images: {int(np.sum(counts == 0))} normal, "
      f"{int(np.sum(counts == 1))} anomalous, {int(np.sum(counts == -1))} unlabelled"
    )
    galleries = "".join(_gallery_html(r, several) for r in category_runs)
    sections.append(
      f"<section><h2>{escape(category)}</h2><p>{escape(sizes)}</p>"
      + _curves_html(category_runs, methods)
      + _threshold_html(category_runs)
      + galleries
      + "</section>"
    )
  csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
  return (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
    f"<h1>{escape(title)}</h1>"
    f"<p>Dataset: {escape(canonical_dataset(dataset))}. "
    f"Setting: {escape(setting.replace('_', '-'))}.</p>"
    f"<h2>Metrics</h2>{table}{footnotes.html()}{''.join(sections)}"
    "</body></html>\n"
  )


def write_page(
  path,
  title: str,
  dataset: str,
  setting: str,
  summaries: Mapping[str | None, Mapping],
  runs: Sequence[CategoryRun],
) -> pathlib.Path:
  """Writes report.html atomically (a rerun replaces it).

  `summaries`: {method: summary} (`summaries.summarize` or `summarize_seeds`), with the
  key None for a run of one detector; `runs`: every category, method and seed to draw
  (`CategoryRun`). `setting` ("zero_shot" or "few_shot") picks the paper's row to compare
  with when no method names one.
  """
  return atomic_files.write_text(path, render_page(title, dataset, setting, summaries, runs))

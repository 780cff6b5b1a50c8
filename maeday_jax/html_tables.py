"""The metrics table of `report.html` (`maeday_jax.html_report`): per category and method,
with the paper's numbers beside ours for MVTec AD, and each undefined metric as "n/a" with
its reason as a tooltip and a numbered footnote.

The values are laid out as in metrics.md (`maeday_jax.report_tables`, whose formatting,
paper cells and group labels this reuses); only the markup differs.
"""

from __future__ import annotations

from collections.abc import Mapping

from maeday_jax import paper_numbers
from maeday_jax.categories import canonical_dataset
from maeday_jax.html_charts import escape
from maeday_jax.report_tables import (
  METHOD_PAPER_ROWS,
  METHOD_TITLES,
  METRIC_TITLES,
  format_value,
  group_label,
  paper_cells,
  shown_metrics,
)
from maeday_jax.summaries import SUMMARY_METRICS

PAPER_URL = "https://arxiv.org/abs/2211.14307"
MAEDAY_SOURCE = paper_numbers.PaperRow.source  # The dataclass default: the MAEDAY paper.
_PAPER_METRICS = {"image_auroc": 0, "pixel_auroc": 1}  # Their index in `paper_cells`.


class Footnotes:
  """Numbered reasons: each distinct reason gets one number, cells link to it."""

  def __init__(self):
    self.reasons: dict[str, int] = {}

  def mark(self, reason: str) -> str:
    """The superscript link to `reason`'s footnote (numbered on first use)."""
    number = self.reasons.setdefault(reason, len(self.reasons) + 1)
    return f'<sup><a href="#note-{number}">{number}</a></sup>'

  def html(self) -> str:
    """The numbered list of every reason marked so far ("" when none)."""
    items = "".join(f'<li id="note-{n}">{escape(r)}</li>' for r, n in self.reasons.items())
    return f'<ol class="notes">{items}</ol>' if items else ""


def _paper_row(method: str | None, dataset: str, setting: str):
  if canonical_dataset(dataset) != "mvtec_ad":
    return None
  if method in paper_numbers.METHOD_ROWS or not method:
    key = paper_numbers.row_key(setting, method)
  else:
    key = METHOD_PAPER_ROWS.get(method)
  return paper_numbers.SUMMARY_ROWS.get(key or "")


def _value_cell(values: Mapping, name: str, footnotes: Footnotes) -> str:
  value, notes = values.get(name), values.get("notes", {})
  # A failed method's row has one reason for every metric.
  reason = notes.get(name) or (notes.get("failed") if value is None else None)
  if value is None and reason is None:
    reason = "not computed"
  text = escape(format_value(value))
  if reason is None:
    return f"<td>{text}</td>"
  css = ' class="na"' if value is None else ""
  return f'<td{css} title="{escape(reason)}">{text}{footnotes.mark(reason)}</td>'


def metrics_table(summaries: Mapping, dataset: str, setting: str, footnotes: Footnotes) -> str:
  """The table (with its introduction) of {method: summary}; the key None for one detector.

  `setting` ("zero_shot" or "few_shot") picks the paper's row when no method names one.
  """
  methods = list(summaries)
  shown = {n for s in summaries.values() for n in shown_metrics(s)}
  names = [n for n in SUMMARY_METRICS if n in shown]
  papers = {m: _paper_row(m, dataset, setting) for m in methods}
  with_paper = any(papers.values())
  several = len(methods) > 1 or methods[0] is not None
  header = ["Category"] + (["Method"] if several else [])
  for name in names:
    header.append(METRIC_TITLES[name])
    if with_paper and name in _PAPER_METRICS:
      header.append(f"{METRIC_TITLES[name]} (paper)")
  rows = ["<tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>"]

  def row(label: str, method, values: Mapping, paper: tuple, first: bool, css: str = "") -> str:
    cells = []
    if first:
      span = f' rowspan="{len(methods)}"' if len(methods) > 1 else ""
      cells.append(f'<td class="text"{span}>{label}</td>')
    if several:
      cells.append(f'<td class="text">{escape(METHOD_TITLES.get(method, method))}</td>')
    for name in names:
      cells.append(_value_cell(values, name, footnotes))
      if with_paper and name in _PAPER_METRICS:
        cells.append(f'<td class="paper">{escape(paper[_PAPER_METRICS[name]] or "—")}</td>')
    return f"<tr{css}>" + "".join(cells) + "</tr>"

  first_summary = summaries[methods[0]]
  for category in first_summary["per_category"]:
    for i, method in enumerate(methods):
      values = summaries[method]["per_category"].get(category, {})
      paper = paper_cells(papers[method], category=category)
      rows.append(row(escape(category), method, values, paper, i == 0))
  for group, info in first_summary["groups"].items():
    for i, method in enumerate(methods):
      values = dict(summaries[method]["groups"].get(group, {}).get("mean", {}))
      values["notes"] = summaries[method]["groups"].get(group, {}).get("notes", {})
      paper = paper_cells(papers[method], group=group)
      label = f"<b>{escape(group_label(group, info))}</b>"
      rows.append(row(label, method, values, paper, i == 0, ' class="mean"'))
  intro = []
  if seeds := first_summary.get("num_seeds"):
    intro.append(f"Mean ± std over {seeds} seeds (shot selections).")
  # Columns undefined for every category are left out (as in metrics.md): say why.
  dropped = [n for n in SUMMARY_METRICS if n not in shown]
  reasons = {
    v.get("notes", {}).get(n)
    for s in summaries.values()
    for v in s["per_category"].values()
    for n in dropped
  } - {None}
  if dropped:
    intro.append(
      f"Not shown, undefined for every category: {', '.join(METRIC_TITLES[n] for n in dropped)}"
      + (f" ({escape('; '.join(sorted(reasons)))})." if reasons else ".")
    )
  labels = sorted({p.label for p in papers.values() if p and p.source == MAEDAY_SOURCE})
  if labels:
    intro.append(
      f"Paper: {escape('; '.join(labels))} (Schwartz et al. 2022, "
      f'<a href="{PAPER_URL}">arXiv:2211.14307</a>); "—" = not reported.'
    )
  others = sorted({(p.label, p.source) for p in papers.values() if p and p.source != MAEDAY_SOURCE})
  if others:
    published = "; ".join(f"{label} ({source})" for label, source in others)
    intro.append(f'Published: {escape(published)}; "—" = not reported.')
  return f"<p>Values in %. {' '.join(intro)}</p><table>{''.join(rows)}</table>"

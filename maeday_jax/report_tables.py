"""Evaluation summaries as text: the terminal table and the Markdown tables of the paper.

`format_summary_table` prints a `summaries.summarize` / `summarize_seeds` summary for the
terminal; `markdown_table` lays it out like the paper's Tables 1-2, with the paper's
numbers beside ours for MVTec AD (another method's published figures when the report is
of its detector: `paper_numbers.METHOD_ROWS`) and the VAND summary (`vand_summary`);
`methods_markdown_table` puts several few-shot methods side by side.
`reports.write_markdown_table` writes the Markdown to a file. Every name here is also
importable from `maeday_jax.reports`.
"""

from __future__ import annotations

from collections.abc import Mapping

from maeday_jax import paper_numbers
from maeday_jax.categories import canonical_dataset
from maeday_jax.summaries import SUMMARY_METRICS, VAND_DEFINITION

METRIC_TITLES = {
  "image_auroc": "Image AUROC",
  "image_ap": "Image AP",
  "image_f1_max": "Image F1-max",
  "pixel_auroc": "Pixel AUROC",
  "pixel_ap": "Pixel AP",
  "pixel_f1_max": "Pixel F1-max",
  "aupro": "AUPRO@0.3",
  "vand_score": "VAND score",
}


def format_value(value, percent: bool = True) -> str:
  """74.5, '74.5 ± 1.2' for seed summaries, 'n/a' when undefined."""
  scale = 100.0 if percent else 1.0
  if value is None:
    return "n/a"
  if isinstance(value, Mapping):
    return f"{scale * value['mean']:.1f} ± {scale * value['std']:.1f}"
  return f"{scale * value:.1f}"


def shown_metrics(summary: Mapping) -> list[str]:
  # Columns undefined everywhere (e.g. pixel metrics without masks) are dropped.
  rows = list(summary["per_category"].values())
  return [n for n in SUMMARY_METRICS if any(r.get(n) is not None for r in rows)] or ["image_auroc"]


def group_label(group: str, info: Mapping | None = None) -> str:
  """'mean (objects)', or 'mean (objects, 3 of 10)' when some categories were not run."""
  label = group.replace("_", " ")
  if info is not None:
    present, expected = len(info["categories"]), info.get("num_expected", 0)
    if present < expected:
      label += f", {present} of {expected}"
  return f"mean ({label})"


def _collapsed_notes(summary: Mapping) -> list[str]:
  """'- where: metric, metric: reason' lines, one per distinct reason."""
  rows = [(c, v) for c, v in summary["per_category"].items()]
  rows += [(group_label(g, info), info) for g, info in summary["groups"].items()]
  lines = []
  for where, values in rows:
    by_reason: dict[str, list[str]] = {}
    for name, note in values.get("notes", {}).items():
      by_reason.setdefault(note, []).append(name)
    lines += [f"- {where}: {', '.join(names)}: {note}" for note, names in by_reason.items()]
  return lines


def format_summary_table(summary: Mapping) -> str:
  """A plain-text table (percent) of categories and group means, for the terminal."""
  names = shown_metrics(summary)
  header = ["category"] + [METRIC_TITLES[n] for n in names]
  rows = [[c] + [format_value(r.get(n)) for n in names] for c, r in summary["per_category"].items()]
  rows += [
    [group_label(g, info)] + [format_value(info["mean"].get(n)) for n in names]
    for g, info in summary["groups"].items()
  ]
  widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

  def line(cells):
    return "  ".join(
      c.ljust(w) if i == 0 else c.rjust(w)
      for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )

  rule = "-" * len(line(header))
  body = [line(r) for r in rows[: len(summary["per_category"])]]
  means = [line(r) for r in rows[len(summary["per_category"]) :]]
  return "\n".join([line(header), rule, *body, rule, *means])


def paper_cells(row: paper_numbers.PaperRow | None, category=None, group=None):
  """(paper image AUROC, paper pixel AUROC) strings for a category or group row."""
  if row is None:
    return "", ""
  if category is not None:
    value = (row.per_category_image_auroc or {}).get(category)
    return ("—" if value is None else f"{value:.1f}"), "—"
  image = row.image_auroc_for(group)
  pixel = row.pixel_auroc if group == "all" else None
  return ("—" if image is None else f"{image:.1f}"), ("—" if pixel is None else f"{pixel:.1f}")


def _published(row: paper_numbers.PaperRow, name: str) -> str:
  value = {"image_auroc": row.image_auroc, "pixel_auroc": row.pixel_auroc, "aupro": row.aupro}
  return "—" if value.get(name) is None else f"{value[name]:.1f}"


def vand_summary(summary: Mapping, row: paper_numbers.PaperRow | None = None) -> str:
  """The VAND summary of metrics.md: the VAND score (mean over the categories) and, with
  a published `row`, every mean metric of this run beside that row's figures."""
  info = summary["groups"].get("all")
  if info is None:
    return ""
  score = info["mean"].get("vand_score")
  text = f"VAND score: {format_value(score)} ({VAND_DEFINITION}"
  if score is None:
    text += "; undefined here: it needs both image labels and pixel masks"
  text += f"; {group_label('all', info)})."
  if row is None:
    return text + "\n"
  names = list(SUMMARY_METRICS)
  lines = [
    "| | " + " | ".join(METRIC_TITLES[n] for n in names) + " |",
    "|" + "|".join(["---"] * (len(names) + 1)) + "|",
    f"| this run, {group_label('all', info)} | "
    + " | ".join(format_value(info["mean"].get(n)) for n in names)
    + " |",
    f"| {row.label} ({row.source}) | " + " | ".join(_published(row, n) for n in names) + " |",
  ]
  return text + "\n\n" + "\n".join(lines) + "\n"


def markdown_table(
  summary: Mapping,
  dataset: str,
  setting: str = "zero_shot",
  paper_row: str | None = None,
  shots: int | None = None,
  method: str | None = None,
) -> str:
  """The Markdown text of `write_markdown_table`; `method` (the detector's) picks its own
  published figures where it has some (`paper_numbers.METHOD_ROWS`: april_gan)."""
  if setting not in paper_numbers.DEFAULT_ROW_FOR_SETTING:
    raise ValueError(f"setting must be 'zero_shot' or 'few_shot', got {setting!r}.")
  dataset = canonical_dataset(dataset)
  row = None
  if dataset == "mvtec_ad":
    key = paper_row or paper_numbers.row_key(setting, method)
    if key not in paper_numbers.SUMMARY_ROWS:
      raise ValueError(
        f"paper_row must be one of {sorted(paper_numbers.SUMMARY_ROWS)}, got {key!r}."
      )
    row = paper_numbers.SUMMARY_ROWS[key]
  names = shown_metrics(summary)
  rest = [n for n in names if n not in ("image_auroc", "pixel_auroc")]

  header = ["Category", "Image AUROC"]
  header += ["Image AUROC (paper)"] if row else []
  if "pixel_auroc" in names:
    header += ["Pixel AUROC"] + (["Pixel AUROC (paper)"] if row else [])
  header += [METRIC_TITLES[n] for n in rest]

  def cells(label, values, paper):
    out = [label, format_value(values.get("image_auroc"))]
    out += [paper[0]] if row else []
    if "pixel_auroc" in names:
      out += [format_value(values.get("pixel_auroc"))] + ([paper[1]] if row else [])
    return out + [format_value(values.get(n)) for n in rest]

  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  for category, values in summary["per_category"].items():
    cat_cells = cells(category, values, paper_cells(row, category=category))
    lines.append("| " + " | ".join(cat_cells) + " |")
  for group, info in summary["groups"].items():
    label = f"**{group_label(group, info)}**"
    group_cells = cells(label, info["mean"], paper_cells(row, group=group))
    lines.append("| " + " | ".join(group_cells) + " |")

  setting_text = setting.replace("_", "-")
  if shots is not None and setting == "few_shot":
    setting_text = f"{shots}-shot"
  seeds = summary.get("num_seeds")
  intro = [f"Dataset: {dataset}. Setting: {setting_text}. Values in %."]
  if seeds:
    intro.append(f"Mean ± std over {seeds} seeds (shot selections).")
  if row:
    intro.append(f"Paper: {row.label} ({row.source}); '—' = not reported.")
    if setting == "few_shot" and shots not in (None, 1) and paper_row is None:
      intro.append(f"Note: the paper's few-shot numbers are 1-shot; this run used {shots} shots.")
  notes = _collapsed_notes(summary)
  text = "\n".join(intro) + "\n\n" + "\n".join(lines) + "\n"
  if vand := vand_summary(summary, row):
    text += "\n" + vand
  return text + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else "")


# The paper's row for each few-shot method (Tables 1/2: MAEDAY, PC, 2 x PC, MAEDAY + PC).
METHOD_PAPER_ROWS = {
  "maeday": "maeday_one_shot_lora",
  "patchcore": "patchcore_one_shot",
  "patchcore_x2": "patchcore_x2_ensemble",
  "ensemble": "maeday_patchcore_ensemble",
}
METHOD_TITLES = {
  "maeday": "MAEDAY",
  "patchcore": "PC",
  "patchcore_x2": "2 x PC",
  "ensemble": "MAEDAY + PC",
  "anomalydino": "AnomalyDINO",
  "maeday_anomalydino": "MAEDAY + AnomalyDINO",
}


def methods_markdown_table(per_method: Mapping[str, Mapping], dataset: str, shots: int) -> str:
  """Image and pixel AUROC of several methods side by side (the paper's Table 1/2 layout).

  `per_method`: {method: `summarize_seeds` summary}. For MVTec AD the paper's means are
  given in brackets beside ours on the group rows.
  """
  dataset = canonical_dataset(dataset)
  methods = list(per_method)
  paper = {
    m: paper_numbers.SUMMARY_ROWS.get(METHOD_PAPER_ROWS.get(m, ""))
    if dataset == "mvtec_ad"
    else None
    for m in methods
  }
  header = ["Category"]
  for m in methods:
    title = METHOD_TITLES.get(m, m)
    header += [f"{title} image AUROC", f"{title} pixel AUROC"]
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
  first = per_method[methods[0]]

  def row(label, values_of, paper_of):
    cells = [label]
    for m in methods:
      values = values_of(per_method[m])
      image_paper, pixel_paper = paper_of(paper[m])
      image = format_value(values.get("image_auroc"))
      pixel = format_value(values.get("pixel_auroc"))
      cells += [
        f"{image} ({image_paper})" if image_paper else image,
        f"{pixel} ({pixel_paper})" if pixel_paper else pixel,
      ]
    return "| " + " | ".join(cells) + " |"

  for category in first["per_category"]:
    lines.append(
      row(
        category,
        lambda s, c=category: s["per_category"].get(c, {}),
        # Per category the paper lists few numbers: show only those it has.
        lambda r, c=category: tuple(
          "" if v == "—" else v for v in (paper_cells(r, category=c) if r else ("", ""))
        ),
      )
    )
  for group, info in first["groups"].items():
    lines.append(
      row(
        f"**{group_label(group, info)}**",
        lambda s, g=group: s["groups"].get(g, {}).get("mean", {}),
        lambda r, g=group: paper_cells(r, group=g) if r else ("", ""),
      )
    )
  seeds = first.get("num_seeds")
  intro = [f"Dataset: {dataset}. Setting: {shots}-shot, same shots for every method. Values in %."]
  if seeds:
    intro.append(f"Mean ± std over {seeds} seeds (shot selections).")
  if any(paper.values()):
    intro.append("In brackets: the paper's numbers (1-shot; '—' = not reported).")
  return "\n".join(intro) + "\n\n" + "\n".join(lines) + "\n"

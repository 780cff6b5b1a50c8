"""Evaluation results as files people read: metrics.json, a Markdown table, a per-image CSV.

The flow for one run: build a `CategoryResult` per category, `category_metrics` each,
`summarize` them (group means: objects / textures / all for MVTec AD), then write with
`write_metrics_json`, `write_markdown_table` and `write_scores_csv`. A few-shot run repeats
that per seed and combines the summaries with `summarize_seeds` (mean ± std over seeds).

A metric that is undefined for a category (one class only, no masks) is `None` (`null` in
JSON) and its reason goes to that category's `notes`; group means are taken over the
categories where the metric is defined, and say so in the group's `notes`.

Every file is written atomically (`atomic_files`): complete, or not at all.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from maeday_jax import atomic_files, metrics, paper_numbers
from maeday_jax.categories import CATEGORY_GROUPS, canonical_dataset
from maeday_jax.thresholds import Threshold

METRIC_NAMES = metrics.METRIC_NAMES
METRIC_TITLES = {
  "image_auroc": "Image AUROC",
  "image_ap": "Image AP",
  "image_f1_max": "Image F1-max",
  "pixel_auroc": "Pixel AUROC",
  "pixel_ap": "Pixel AP",
  "pixel_f1_max": "Pixel F1-max",
  "aupro": "AUPRO@0.3",
}


@dataclasses.dataclass
class CategoryResult:
  """Everything evaluated for one category (and one seed).

  Attributes:
    category: category name, e.g. "bottle".
    file_names: (N) test image paths or names, in the order of `labels` and `scores`.
    labels: (N,) int, 1 anomalous, 0 normal, -1 unknown (left out of image metrics).
    scores: (N,) float image anomaly scores.
    pixels: a `metrics.PixelMetricAccumulator` fed the anomaly maps and ground-truth masks
      batch by batch, or None without ground truth (no pixel metrics).
    seed: shot-selection seed of a few-shot run, None for zero-shot.
  """

  category: str
  file_names: list[str]
  labels: np.ndarray
  scores: np.ndarray
  pixels: metrics.PixelMetricAccumulator | None = None
  seed: int | None = None

  def __post_init__(self):
    self.labels = np.asarray(self.labels, dtype=np.int64)
    self.scores = np.asarray(self.scores, dtype=np.float64)
    n = len(self.file_names)
    if self.labels.shape != (n,) or self.scores.shape != (n,):
      raise ValueError(
        f"{self.category}: {n} file names but labels {self.labels.shape} and scores "
        f"{self.scores.shape}; they must all describe the same N images."
      )


def _attempt(compute: Callable[[], float], name: str, notes: dict) -> float | None:
  try:
    return float(compute())
  except metrics.MetricUndefinedError as error:
    notes[name] = error.reason
    return None


def category_metrics(
  result: CategoryResult, *, pixel: bool = True, fpr_limit: float = metrics.DEFAULT_FPR_LIMIT
) -> dict:
  """Every metric of one category: {metric: float or None, counts..., "notes": {...}}.

  Keys: the seven `METRIC_NAMES`, `num_images`, `num_normal`, `num_anomalous`, `num_unknown`,
  and `notes` mapping a metric (or "pixel_metrics") to why it is undefined or approximate.
  """
  notes: dict[str, str] = {}
  scores, labels = result.scores, result.labels
  out: dict = {
    "image_auroc": _attempt(lambda: metrics.image_auroc(scores, labels), "image_auroc", notes),
    "image_ap": _attempt(lambda: metrics.image_ap(scores, labels), "image_ap", notes),
    "image_f1_max": _attempt(lambda: metrics.f1_max(scores, labels), "image_f1_max", notes),
  }
  accumulator = result.pixels if pixel else None
  if accumulator is None:
    reason = "no ground-truth masks were given" if pixel else "pixel metrics were not requested"
    for name in metrics.PIXEL_METRICS:
      out[name] = None
      notes[name] = reason
  else:
    out["pixel_auroc"] = _attempt(accumulator.auroc, "pixel_auroc", notes)
    out["pixel_ap"] = _attempt(accumulator.ap, "pixel_ap", notes)
    out["pixel_f1_max"] = _attempt(accumulator.f1_max, "pixel_f1_max", notes)
    out["aupro"] = _attempt(lambda: accumulator.aupro(fpr_limit), "aupro", notes)
    if not accumulator.is_exact:
      notes["pixel_metrics"] = (
        f"computed on binned scores (relative bin width {accumulator.relative_resolution:.1e}); "
        f"pixel AUROC is within {accumulator.auroc_error_bound():.1e} of the exact value"
      )
  out.update(
    num_images=len(labels),
    num_normal=int(np.sum(labels == 0)),
    num_anomalous=int(np.sum(labels == 1)),
    num_unknown=int(np.sum(labels == -1)),
    notes=notes,
  )
  return out


def category_groups(dataset: str, categories: Sequence[str]) -> dict[str, list[str]]:
  """The groups to average over: the dataset's own groups present here, then 'all'."""
  groups = {}
  for group, members in CATEGORY_GROUPS.get(canonical_dataset(dataset), {}).items():
    present = [c for c in members if c in categories]
    if present:
      groups[group] = present
  groups["all"] = ordered_categories(dataset, categories)
  return groups


def ordered_categories(dataset: str, categories: Sequence[str]) -> list[str]:
  """Categories in the dataset's customary order (MVTec: objects, then textures)."""
  known = [c for g in CATEGORY_GROUPS.get(canonical_dataset(dataset), {}).values() for c in g]
  return [c for c in known if c in categories] + [c for c in categories if c not in known]


def _group_mean(
  per_category: Mapping[str, Mapping], members: Sequence[str], name: str, notes: dict
) -> float | None:
  values = {c: per_category[c].get(name) for c in members}
  defined = [v for v in values.values() if v is not None]
  missing = [c for c, v in values.items() if v is None]
  if missing:
    notes[name] = (
      f"mean over {len(defined)} of {len(members)} categories; undefined for {', '.join(missing)}"
    )
  return float(np.mean(defined)) if defined else None


def summarize(per_category: Mapping[str, Mapping], dataset: str, seed: int | None = None) -> dict:
  """Per-category metrics plus group means: {"dataset", "per_category", "groups", ...}.

  `groups[g]` is {"categories": [...], "mean": {metric: float or None}, "notes": {...}}.
  """
  known = CATEGORY_GROUPS.get(canonical_dataset(dataset), {})
  expected = {g: len(members) for g, members in known.items()}
  if known:
    expected["all"] = sum(expected.values())
  groups = {}
  for group, members in category_groups(dataset, list(per_category)).items():
    notes: dict[str, str] = {}
    mean = {name: _group_mean(per_category, members, name, notes) for name in METRIC_NAMES}
    # How many categories the dataset defines for the group: a partial run's mean is not the
    # paper's mean, and the tables say so.
    groups[group] = {
      "categories": members,
      "num_expected": expected.get(group, len(members)),
      "mean": mean,
      "notes": notes,
    }
  order = ordered_categories(dataset, list(per_category))
  return {
    "dataset": canonical_dataset(dataset),
    "seed": seed,
    "metric_names": list(METRIC_NAMES),
    "per_category": {c: dict(per_category[c]) for c in order},
    "groups": groups,
  }


def _mean_std(values: Sequence[float | None]) -> dict | None:
  defined = [v for v in values if v is not None]
  if not defined:
    return None
  # Population std (ddof 0), as numpy's default; with 3 seeds it reads as the spread seen.
  return {
    "mean": float(np.mean(defined)),
    "std": float(np.std(defined)),
    "num_seeds": len(defined),
    "values": [None if v is None else float(v) for v in values],
  }


def summarize_seeds(per_seed: Sequence[Mapping]) -> dict:
  """Combines `summarize` outputs of several seeds into mean ± std per metric.

  Each metric becomes {"mean", "std", "num_seeds", "values"} (None if undefined in every
  seed); group rows are the mean ± std of the per-seed group means. The per-seed summaries
  are kept under "runs".
  """
  if not per_seed:
    raise ValueError("summarize_seeds needs at least one per-seed summary.")
  dataset = per_seed[0]["dataset"]
  categories = list(dict.fromkeys(c for s in per_seed for c in s["per_category"]))
  per_category = {}
  for category in categories:
    rows = [s["per_category"].get(category, {}) for s in per_seed]
    per_category[category] = {n: _mean_std([r.get(n) for r in rows]) for n in METRIC_NAMES}
    notes = {}
    for seed_index, row in enumerate(rows):
      for key, note in row.get("notes", {}).items():
        notes.setdefault(key, f"seed run {seed_index}: {note}")
    per_category[category]["notes"] = notes
  groups = {}
  for group, info in per_seed[0]["groups"].items():
    means = [s["groups"].get(group, {}).get("mean", {}) for s in per_seed]
    notes = {}
    for s in per_seed:
      notes.update(s["groups"].get(group, {}).get("notes", {}))
    groups[group] = {
      "categories": info["categories"],
      "num_expected": info.get("num_expected", len(info["categories"])),
      "mean": {n: _mean_std([m.get(n) for m in means]) for n in METRIC_NAMES},
      "notes": notes,
    }
  return {
    "dataset": dataset,
    "seeds": [s.get("seed") for s in per_seed],
    "num_seeds": len(per_seed),
    "std_ddof": 0,
    "metric_names": list(METRIC_NAMES),
    "per_category": per_category,
    "groups": groups,
    "runs": list(per_seed),
  }


# ---------------------------------------------------------------------------------------------
# Writing.


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


def format_value(value, percent: bool = True) -> str:
  """74.5, '74.5 ± 1.2' for seed summaries, 'n/a' when undefined."""
  scale = 100.0 if percent else 1.0
  if value is None:
    return "n/a"
  if isinstance(value, Mapping):
    return f"{scale * value['mean']:.1f} ± {scale * value['std']:.1f}"
  return f"{scale * value:.1f}"


def _shown_metrics(summary: Mapping) -> list[str]:
  # Columns undefined everywhere (e.g. pixel metrics without masks) are dropped.
  rows = list(summary["per_category"].values())
  return [n for n in METRIC_NAMES if any(r.get(n) is not None for r in rows)] or ["image_auroc"]


def _group_label(group: str, info: Mapping | None = None) -> str:
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
  rows += [(_group_label(g, info), info) for g, info in summary["groups"].items()]
  lines = []
  for where, values in rows:
    by_reason: dict[str, list[str]] = {}
    for name, note in values.get("notes", {}).items():
      by_reason.setdefault(note, []).append(name)
    lines += [f"- {where}: {', '.join(names)}: {note}" for note, names in by_reason.items()]
  return lines


def format_summary_table(summary: Mapping) -> str:
  """A plain-text table (percent) of categories and group means, for the terminal."""
  names = _shown_metrics(summary)
  header = ["category"] + [METRIC_TITLES[n] for n in names]
  rows = [[c] + [format_value(r.get(n)) for n in names] for c, r in summary["per_category"].items()]
  rows += [
    [_group_label(g, info)] + [format_value(info["mean"].get(n)) for n in names]
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


def _paper_cells(row: paper_numbers.PaperRow | None, category=None, group=None):
  """(paper image AUROC, paper pixel AUROC) strings for a category or group row."""
  if row is None:
    return "", ""
  if category is not None:
    value = (row.per_category_image_auroc or {}).get(category)
    return ("—" if value is None else f"{value:.1f}"), "—"
  image = row.image_auroc_for(group)
  pixel = row.pixel_auroc if group == "all" else None
  return ("—" if image is None else f"{image:.1f}"), ("—" if pixel is None else f"{pixel:.1f}")


def markdown_table(
  summary: Mapping,
  dataset: str,
  setting: str = "zero_shot",
  paper_row: str | None = None,
  shots: int | None = None,
) -> str:
  """The Markdown text of `write_markdown_table`."""
  if setting not in paper_numbers.DEFAULT_ROW_FOR_SETTING:
    raise ValueError(f"setting must be 'zero_shot' or 'few_shot', got {setting!r}.")
  dataset = canonical_dataset(dataset)
  row = None
  if dataset == "mvtec_ad":
    key = paper_row or paper_numbers.DEFAULT_ROW_FOR_SETTING[setting]
    if key not in paper_numbers.SUMMARY_ROWS:
      raise ValueError(
        f"paper_row must be one of {sorted(paper_numbers.SUMMARY_ROWS)}, got {key!r}."
      )
    row = paper_numbers.SUMMARY_ROWS[key]
  names = _shown_metrics(summary)
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
    cat_cells = cells(category, values, _paper_cells(row, category=category))
    lines.append("| " + " | ".join(cat_cells) + " |")
  for group, info in summary["groups"].items():
    label = f"**{_group_label(group, info)}**"
    group_cells = cells(label, info["mean"], _paper_cells(row, group=group))
    lines.append("| " + " | ".join(group_cells) + " |")

  setting_text = setting.replace("_", "-")
  if shots is not None and setting == "few_shot":
    setting_text = f"{shots}-shot"
  seeds = summary.get("num_seeds")
  intro = [f"Dataset: {dataset}. Setting: {setting_text}. Values in %."]
  if seeds:
    intro.append(f"Mean ± std over {seeds} seeds (shot selections).")
  if row:
    intro.append(f"Paper: {row.label} (Schwartz et al. 2022); '—' = not reported.")
    if setting == "few_shot" and shots not in (None, 1) and paper_row is None:
      intro.append(f"Note: the paper's few-shot numbers are 1-shot; this run used {shots} shots.")
  notes = _collapsed_notes(summary)
  text = "\n".join(intro) + "\n\n" + "\n".join(lines) + "\n"
  return text + ("\nNotes:\n" + "\n".join(notes) + "\n" if notes else "")


def write_markdown_table(
  path,
  summary: Mapping,
  dataset: str,
  setting: str = "zero_shot",
  paper_row: str | None = None,
  shots: int | None = None,
) -> pathlib.Path:
  """Writes a table shaped like the paper's Tables 1-2, with the paper's numbers for MVTec AD.

  `paper_row` picks another row of `paper_numbers.SUMMARY_ROWS` to compare with (e.g.
  "maeday_patchcore_ensemble"); by default zero-shot compares with MAEDAY 0-shot and
  few-shot with MAEDAY 1-shot (LoRA).
  """
  return atomic_files.write_text(path, markdown_table(summary, dataset, setting, paper_row, shots))


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
          "" if v == "—" else v for v in (_paper_cells(r, category=c) if r else ("", ""))
        ),
      )
    )
  for group, info in first["groups"].items():
    lines.append(
      row(
        f"**{_group_label(group, info)}**",
        lambda s, g=group: s["groups"].get(g, {}).get("mean", {}),
        lambda r, g=group: _paper_cells(r, group=g) if r else ("", ""),
      )
    )
  seeds = first.get("num_seeds")
  intro = [f"Dataset: {dataset}. Setting: {shots}-shot, same shots for every method. Values in %."]
  if seeds:
    intro.append(f"Mean ± std over {seeds} seeds (shot selections).")
  if any(paper.values()):
    intro.append("In brackets: the paper's numbers (1-shot; '—' = not reported).")
  return "\n".join(intro) + "\n\n" + "\n".join(lines) + "\n"

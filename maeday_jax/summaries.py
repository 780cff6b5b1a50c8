"""Per-category evaluation results and their summaries (group means, mean ± std over seeds).

The flow for one run: build a `CategoryResult` per category, `category_metrics` each,
`summarize` them (group means: objects / textures / all for MVTec AD). A few-shot run
repeats that per seed and combines the summaries with `summarize_seeds`. `reports` writes
the summaries to files; every name here is also importable from `maeday_jax.reports`.

A metric that is undefined for a category (one class only, no masks) is `None` (`null` in
JSON) and its reason goes to that category's `notes`; group means are taken over the
categories where the metric is defined, and say so in the group's `notes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from maeday_jax import metrics
from maeday_jax.categories import CATEGORY_GROUPS, canonical_dataset

METRIC_NAMES = metrics.METRIC_NAMES
# The VAND 2023 challenge's score (`metrics.vand_score`): derived per category from the two
# F1-max, averaged over categories like the others.
VAND_SCORE = "vand_score"
SUMMARY_METRICS = (*METRIC_NAMES, VAND_SCORE)
VAND_DEFINITION = (
  "VAND 2023 challenge score: per category the harmonic mean of image F1-max "
  "(classification) and pixel F1-max (segmentation), averaged over categories"
)


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

  Keys: the seven `METRIC_NAMES`, `vand_score` (`metrics.vand_score`), `num_images`,
  `num_normal`, `num_anomalous`, `num_unknown`, and `notes` mapping a metric (or
  "pixel_metrics") to why it is undefined or approximate.
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
  out[VAND_SCORE] = metrics.vand_score(out["image_f1_max"], out["pixel_f1_max"])
  if out[VAND_SCORE] is None:
    notes[VAND_SCORE] = "needs both the image and the pixel F1-max"
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


def with_vand_score(row: Mapping) -> dict:
  """A category's metrics with `vand_score`, computed from its two F1-max when missing
  (rows not made by `category_metrics`, e.g. a failed method's)."""
  row = dict(row)
  if VAND_SCORE not in row:
    row[VAND_SCORE] = metrics.vand_score(row.get("image_f1_max"), row.get("pixel_f1_max"))
  return row


def summarize(per_category: Mapping[str, Mapping], dataset: str, seed: int | None = None) -> dict:
  """Per-category metrics plus group means: {"dataset", "per_category", "groups", ...}.

  `groups[g]` is {"categories": [...], "mean": {metric: float or None}, "notes": {...}};
  the metrics are `SUMMARY_METRICS` (with the VAND score). `vand_score` at the top is
  the VAND challenge's summary: the mean over all categories of their `vand_score`.
  """
  per_category = {c: with_vand_score(row) for c, row in per_category.items()}
  known = CATEGORY_GROUPS.get(canonical_dataset(dataset), {})
  expected = {g: len(members) for g, members in known.items()}
  if known:
    expected["all"] = sum(expected.values())
  groups = {}
  for group, members in category_groups(dataset, list(per_category)).items():
    notes: dict[str, str] = {}
    mean = {name: _group_mean(per_category, members, name, notes) for name in SUMMARY_METRICS}
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
    "metric_names": list(SUMMARY_METRICS),
    "per_category": {c: dict(per_category[c]) for c in order},
    "groups": groups,
    VAND_SCORE: groups["all"]["mean"][VAND_SCORE],
    "vand_definition": VAND_DEFINITION,
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
    rows = [with_vand_score(r) for r in rows]
    per_category[category] = {n: _mean_std([r.get(n) for r in rows]) for n in SUMMARY_METRICS}
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
      "mean": {n: _mean_std([m.get(n) for m in means]) for n in SUMMARY_METRICS},
      "notes": notes,
    }
  return {
    "dataset": dataset,
    "seeds": [s.get("seed") for s in per_seed],
    "num_seeds": len(per_seed),
    "std_ddof": 0,
    "metric_names": list(SUMMARY_METRICS),
    "per_category": per_category,
    "groups": groups,
    VAND_SCORE: groups.get("all", {}).get("mean", {}).get(VAND_SCORE),
    "vand_definition": VAND_DEFINITION,
    "runs": list(per_seed),
  }

"""The PMAD recipe: fit PMAD under one of its paper's protocols, test it, and write the
table beside the published figures.

    python -m maeday_jax.main --config configs/pmad.py --workdir runs/pmad \
      --config.data.name=mvtec_ad --config.data.path=/data/mvtec_anomaly_detection \
      --config.protocol.name=multi

Protocols (`config.protocol.name`):
  single  one detector per category of `data` (trained on that category's normals)
  multi   one detector for every category of `data` at once (one reconstructor, one bank
          of prototypes of all of them)
  cross   the reconstructor trained once on `data`'s categories (the seen classes), then
          one detector per category of `protocol.unseen`: prototypes and flow from its
          normal training images only, nothing retrained

Outputs under the work directory:
  <category>/detector/    the fitted detector of that category (single, cross); for multi
  detector/               the one detector (`configs/score.py` scores with either)
  <category>/training/    the reconstructor's training (single), `seen/training/` (cross),
  training/ (multi): checkpoints, metrics.jsonl, training.png, reconstructor/
  <category>/eval/, eval/ scores.csv, maps, metrics.json of the test images
  metrics.json            every tested category's metrics, their mean and the published
                          figures; pmad_table.md the same as a table
Rerunning the same command resumes: fitted detectors are kept, training resumes.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections

from maeday_jax import data, detectors, reports
from maeday_jax.detectors import pmad as pmad_detector
from maeday_jax.detectors import registry
from maeday_jax.jobs import common, recipe_eval
from maeday_jax.pmad import published

PROTOCOLS = ("single", "multi", "cross")
ARTIFACT_DIR = "detector"


def _names(value) -> list[str]:
  items = value.split(",") if isinstance(value, str) else list(value)
  return [str(item).strip() for item in items if str(item).strip()]


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every setting before any data is read or anything trains.

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  protocol = config.protocol
  common.require(
    protocol.name in PROTOCOLS,
    "protocol.name",
    f"{protocol.name!r}: use one of {', '.join(PROTOCOLS)}.",
  )
  if protocol.name == "cross":
    common.require(
      bool(_names(protocol.unseen)),
      "protocol.unseen",
      "is empty: the cross-class protocol tests categories the reconstructor never saw; "
      "name them (comma-separated).",
    )
    common.require(
      not protocol.paper_split or protocol.paper_split in published.CROSS_CLASS_MVTEC,
      "protocol.paper_split",
      f"{protocol.paper_split!r}: use one of {', '.join(published.CROSS_CLASS_MVTEC)} or ''.",
    )
  pmad_detector.validate_section(config.pmad)
  registry.validate_tiling(pmad_detector.Pmad, config)
  common.validate_training_sources([config.data, *config.extra_data], "data")
  ev = config.eval
  common.require(ev.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {ev.batch_size}.")
  common.require_divides_devices(ev.batch_size, "eval.batch_size")
  common.require(ev.eval_size >= 0, "eval.eval_size", f"must be >= 0, got {ev.eval_size}.")
  common.validate_threshold(ev.threshold, recipe_eval.eval_data(config), "eval.threshold")


def _plan(config) -> list[tuple[str, list[str], list[str]]]:
  """(folder, training categories, test categories) of every detector the protocol fits."""
  seen = data.resolve_categories(config.data)
  tested = data.resolve_categories(recipe_eval.eval_data(config))
  name = config.protocol.name
  if name == "multi":
    return [("", seen, tested)]
  if name == "single":
    missing = [c for c in seen if c not in tested]
    common.require(
      not missing,
      "eval.data.categories",
      f"has no test images of {', '.join(missing)}: each trained category is tested.",
    )
    return [(c, [c], [c]) for c in seen]
  unseen = _names(config.protocol.unseen)
  overlap = sorted(set(unseen) & set(seen))
  common.require(
    not overlap,
    "protocol.unseen",
    f"{', '.join(overlap)} are also training categories (data.categories): cross-class "
    "tests categories the reconstructor never saw.",
  )
  missing = [c for c in unseen if c not in tested]
  common.require(
    not missing, "protocol.unseen", f"{', '.join(missing)} are not in eval.data's categories."
  )
  return [(u, [u], [u]) for u in unseen]


def _source(config, categories: list[str]) -> ml_collections.ConfigDict:
  source = ml_collections.ConfigDict(config.data.to_dict())
  source.categories = ",".join(categories)
  return source


def _fit(config, folder: pathlib.Path, categories: list[str], reconstructor: str = ""):
  """The fitted detector in `folder/detector` (loaded when an earlier run saved it)."""
  if detectors.is_artifact(folder / ARTIFACT_DIR):
    return detectors.load(folder / ARTIFACT_DIR)
  settings = registry.settings_of(pmad_detector.Pmad, config)
  settings.pmad.reconstructor = reconstructor
  detector = pmad_detector.Pmad(settings)
  normals = detectors.NormalImages(
    read=lambda size: (None, None),  # PMAD trains on the data sources, not on shots.
    data=_source(config, categories),
    extra_data=list(config.extra_data),
    workdir=folder / "training",
    category=categories[0] if len(categories) == 1 else None,
  )
  detector.fit(normals, jax.random.key(config.seed))
  detectors.save(detector, folder / ARTIFACT_DIR)
  return detector


def _reconstructor(config, workdir: pathlib.Path) -> str:
  """Cross-class: the reconstructor trained once on the seen categories (its folder)."""
  from maeday_jax.pmad import training

  seen = data.resolve_categories(config.data)
  folder = workdir / "seen"
  path = folder / "training" / "pmad_training" / training.RECONSTRUCTOR_DIR
  if not path.is_dir():
    _fit(config, folder, seen)
  return str(path)


def _table(per_category: dict, mean: dict, reference, protocol: str) -> str:
  lines = [
    f"PMAD, {protocol} protocol",
    "",
    "| category | image AUROC | pixel AUROC | AUPRO |",
    "| --- | --- | --- | --- |",
  ]
  for category, metrics in [*per_category.items(), ("mean", mean)]:
    cells = [reports.format_value(metrics.get(name)) for name in recipe_eval.SHOWN]
    lines.append(f"| {category} | " + " | ".join(cells) + " |")
  if reference is not None:
    lines.append(f"| published (mean) | {reference[0]:.1f} | {reference[1]:.1f} | - |")
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Fits and tests PMAD as `config.protocol` says; returns the summary."""
  validate(config)
  plan = _plan(config)
  workdir = common.prepare_workdir(workdir, config)
  reconstructor = _reconstructor(config, workdir) if config.protocol.name == "cross" else ""
  per_category = {}
  for folder, trained, tested in plan:
    detector = _fit(config, workdir / folder, trained, reconstructor)
    summary = recipe_eval.evaluate(
      recipe_eval.scoring(detector, config), config, workdir / folder / "eval", tested
    )
    per_category.update(summary["per_category"])
  mean = {name: _mean([m.get(name) for m in per_category.values()]) for name in recipe_eval.SHOWN}
  dataset = recipe_eval.eval_data(config).name
  reference = published.reference(
    dataset, config.protocol.name, config.protocol.get("paper_split", "")
  )
  result = {
    "protocol": config.protocol.name,
    "per_category": per_category,
    "mean": mean,
    "published": None
    if reference is None
    else {"image_auroc": reference[0], "pixel_auroc": reference[1]},
  }
  if jax.process_index() == 0:
    common.write_json(workdir / "metrics.json", result)
    table = _table(per_category, mean, reference, config.protocol.name)
    (workdir / "pmad_table.md").write_text(table)
    print(table)
    print(f"Outputs in {workdir}")
  return result


def _mean(values):
  known = [v for v in values if isinstance(v, (int, float))]
  return sum(known) / len(known) if known else None

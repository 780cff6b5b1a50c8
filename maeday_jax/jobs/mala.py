"""The MALA recipe: fit the MALA detector (stage 1 MAE, stage 2 segmenter), then score
the test images with it and, for comparison, with MAEDAY on the stage-1 MAE.

    python -m maeday_jax.main --config configs/mala.py --workdir runs/mala

Outputs under the work directory:
  stage1/                    MAE training (`maeday_jax.pretrain`): checkpoints, metrics,
                             training.png, model/ (skipped when stage 1 is off)
  stage2/                    segmenter training (`maeday_jax.mala.stage2`): checkpoints,
                             metrics.jsonl, training.png, segmenter/
  detector/                  the fitted MALA detector (`configs/score.py` and
                             `configs/evaluate.py` take it as --config.detector)
  mala/                      the segmenter's scores.csv, maps, overlays, panels, metrics
  maeday/                    the same for the stage-1 MAE's reconstruction error
                             (`eval.maeday`), for comparison
  comparison.md              both methods' image AUROC, pixel AUROC and AUPRO
  config.json                the resolved configuration
Rerunning the same command resumes whichever stage was interrupted.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections

from maeday_jax import data, defaults, detectors, evaluation, reports
from maeday_jax.detectors import mala as mala_detector
from maeday_jax.detectors import registry
from maeday_jax.jobs import common, run_report

_SHOWN = ("image_auroc", "pixel_auroc", "aupro")
ARTIFACT_DIR = "detector"
# The `data` fields the test images share with the training source (`eval_data`).
_SHARED_DATA_FIELDS = ("mask_path", "normal_path", "data_dir", "num_workers", "prefetch")


def detector_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The MALA detector's settings from this recipe's config (`defaults.mala_config`)."""
  settings = ml_collections.ConfigDict()
  settings.seed = config.seed
  settings.model = config.model
  settings.mala = ml_collections.ConfigDict()
  for field in ("stage1", "stage2", "pool_size", "checkpoint_every", "keep_checkpoints"):
    settings.mala[field] = config[field]
  settings.mala.log_every = config.log_every
  settings.extra_data = list(config.extra_data)
  return ml_collections.ConfigDict(settings.to_dict())


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


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every setting before any data is read or anything trains or compiles.

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  settings = detector_settings(config)
  mala_detector.validate_sections(config.model, settings.mala, "")  # Stage 1's recipe too.
  common.validate_training_sources([config.data, *config.extra_data], "data")
  test = eval_data(config)
  common.require(
    not config.data.get("mask_path") or bool(test.get("mask_path")),
    "data.mask_path",
    "is set, but MALA trains on normal images only and scores eval.data, another source "
    f"here ({test.name}:{test.path or '(default)'}): give the test images' masks as "
    "--config.eval.data.mask_path.",
  )
  ev = config.eval
  common.require(ev.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {ev.batch_size}.")
  common.require_divides_devices(ev.batch_size, "eval.batch_size")
  common.require(
    ev.eval_size >= 0,
    "eval.eval_size",
    f"must be >= 0 (0 = the model's input size), got {ev.eval_size}.",
  )
  common.require(
    ev.get("eval_original_max_side", 0) >= 0,
    "eval.eval_original_max_side",
    f"must be >= 0 (0 = off), got {ev.get('eval_original_max_side')}.",
  )
  if ev.maeday:
    common.require(ev.num_masks >= 1, "eval.num_masks", f"must be >= 1, got {ev.num_masks}.")
  common.require(
    0.0 <= ev.mask_ratio < 1.0, "eval.mask_ratio", f"must be in [0, 1), got {ev.mask_ratio}."
  )
  common.validate_threshold(ev.threshold, test, "eval.threshold")


def check_data(config: ml_collections.ConfigDict) -> None:
  """Resolves the training sources' and the test images' categories before training (a
  wrong path or category fails now, not after both stages).

  Raises:
    DataError: naming the source and what is wrong.
  """
  for source in (config.data, *config.extra_data):
    data.resolve_categories(source)
  data.resolve_categories(eval_data(config))


def _evaluate(scoring: evaluation.Scoring, config, workdir: pathlib.Path):
  """Scores every test category with one detector into `workdir`; returns the summary."""
  scoring_config = defaults.zero_shot_config()
  scoring_config.data = eval_data(config)
  scoring_config.mask_ratio = config.eval.mask_ratio
  scoring_config.threshold = config.eval.threshold
  scoring_config.outputs = config.eval.outputs
  workdir.mkdir(parents=True, exist_ok=True)
  categories = data.resolve_categories(scoring_config.data)
  summary, _ = run_report.evaluate_categories(
    scoring, scoring_config, workdir, categories, "zero_shot"
  )
  return summary


def _scoring(detector, config) -> evaluation.Scoring:
  return evaluation.Scoring.for_detector(
    detector,
    batch_size=config.eval.batch_size,
    eval_size=config.eval.eval_size or None,
    eval_original_max_side=int(config.eval.get("eval_original_max_side") or 0),
  )


def _comparison_table(summaries: dict[str, dict]) -> str:
  lines = [
    "| method | category | image AUROC | pixel AUROC | AUPRO |",
    "| --- | --- | --- | --- | --- |",
  ]
  for method, summary in summaries.items():
    for category, metrics in summary["per_category"].items():
      cells = [reports.format_value(metrics.get(name)) for name in _SHOWN]
      lines.append(f"| {method} | {category} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Trains both stages (resuming), saves the detector, scores the test images; returns
  the training summaries and both methods' evaluations."""
  validate(config)
  check_data(config)
  workdir = common.prepare_workdir(workdir, config)
  mala = registry.get("mala")(detector_settings(config))
  normals = detectors.NormalImages(
    read=lambda size: (None, None),  # MALA trains on the data sources, not on shots.
    data=config.data,
    extra_data=list(config.extra_data),
    workdir=workdir,
  )
  mala.fit(normals, jax.random.key(config.seed))
  detectors.save(mala, workdir / ARTIFACT_DIR)
  result = dict(mala.training)
  summaries = {"MALA": _evaluate(_scoring(mala, config), config, workdir / "mala")}
  if config.eval.maeday:
    maeday_config = defaults.evaluate_config()
    maeday_config.seed = config.seed
    maeday_config.model = ml_collections.ConfigDict(config.model.to_dict())
    maeday_config.model.checkpoint = mala.training["mae_checkpoint"]
    maeday_config.num_masks = config.eval.num_masks
    maeday_config.mask_ratio = config.eval.mask_ratio
    maeday = detectors.create(maeday_config, "maeday")
    maeday.build()
    name = f"MAEDAY (stage-1 MAE, {config.eval.num_masks} masks)"
    summaries[name] = _evaluate(_scoring(maeday, config), config, workdir / "maeday")
  if jax.process_index() == 0:
    table = _comparison_table(summaries)
    (workdir / "comparison.md").write_text(table)
    print(table)
    print(f"Outputs in {workdir}")
  result["evaluation"] = summaries
  return result

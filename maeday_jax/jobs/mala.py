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


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the settings before any long work starts."""
  mala_detector.validate_sections(config.model, detector_settings(config).mala, "")
  common.require_divides_devices(config.eval.batch_size, "eval.batch_size")


def _evaluate(scoring: evaluation.Scoring, config, workdir: pathlib.Path):
  """Scores every test category with one detector into `workdir`; returns the summary."""
  scoring_config = defaults.zero_shot_config()
  scoring_config.data = config.eval.data
  scoring_config.mask_ratio = config.eval.mask_ratio
  scoring_config.threshold = config.eval.threshold
  scoring_config.outputs = config.eval.outputs
  workdir.mkdir(parents=True, exist_ok=True)
  categories = data.resolve_categories(config.eval.data)
  summary, _ = run_report.evaluate_categories(
    scoring, scoring_config, workdir, categories, "zero_shot"
  )
  return summary


def _scoring(detector, config) -> evaluation.Scoring:
  return evaluation.Scoring.for_detector(
    detector, batch_size=config.eval.batch_size, eval_size=config.eval.eval_size or None
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
  data.resolve_categories(config.eval.data)  # Early error for a bad path or category.
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

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

import jax
import ml_collections

from maeday_jax import data, defaults, detectors
from maeday_jax.detectors import mala as mala_detector
from maeday_jax.detectors import registry
from maeday_jax.jobs import common, recipe_eval

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
  """Checks every setting before any data is read or anything trains or compiles.

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  settings = detector_settings(config)
  mala_detector.validate_sections(config.model, settings.mala, "")  # Stage 1's recipe too.
  common.validate_training_sources([config.data, *config.extra_data], "data")
  test = recipe_eval.eval_data(config)
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
  data.resolve_categories(recipe_eval.eval_data(config))


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
  summaries = {
    "MALA": recipe_eval.evaluate(recipe_eval.scoring(mala, config), config, workdir / "mala")
  }
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
    summaries[name] = recipe_eval.evaluate(
      recipe_eval.scoring(maeday, config), config, workdir / "maeday"
    )
  if jax.process_index() == 0:
    table = recipe_eval.comparison_table(summaries)
    (workdir / "comparison.md").write_text(table)
    print(table)
    print(f"Outputs in {workdir}")
  result["evaluation"] = summaries
  return result

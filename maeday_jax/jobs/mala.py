"""The MALA job: stage 1 (the MAE), stage 2 (the segmenter), then scoring the test images.

    python -m maeday_jax.main --config configs/mala.py --workdir runs/mala

Outputs under the work directory:
  stage1/                    MAE training (`maeday_jax.pretrain`): checkpoints, metrics,
                             training.png, model/ (skipped when stage 1 is off)
  stage2/                    segmenter training (`maeday_jax.mala.stage2`): checkpoints,
                             metrics.jsonl, training.png, segmenter/
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

from maeday_jax import checkpoints, data, defaults, evaluation, model_builder, parallel, reports
from maeday_jax.config_errors import require
from maeday_jax.jobs import common, run_report
from maeday_jax.jobs.category_run import run_category
from maeday_jax.mala import segmenter as segmenter_lib
from maeday_jax.mala import stage2
from maeday_jax.pretrain import loop as pretrain_loop

_SHOWN = ("image_auroc", "pixel_auroc", "aupro")


def _stage1_enabled(config) -> bool:
  return bool(config.stage1.get("steps")) or float(config.stage1.epochs) > 0


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the settings before any long work starts."""
  model_builder.validate_model_config(config.model)
  require(
    _stage1_enabled(config) or config.model.checkpoint != defaults.RANDOM_WEIGHTS,
    "stage1.epochs",
    "stage 1 is off (epochs and steps 0) but model.checkpoint is 'random': stage 2 needs "
    "a trained MAE; enable stage 1 or give a checkpoint.",
  )
  sources = stage2._split(config.stage2.synthetic.textures)
  require(
    bool(sources) and all(s in stage2.TEXTURE_SOURCES for s in sources),
    "stage2.synthetic.textures",
    f"{config.stage2.synthetic.textures!r}: give a comma-separated subset of "
    f"{', '.join(stage2.TEXTURE_SOURCES)}.",
  )
  if "folder" in sources:
    require(
      bool(config.stage2.synthetic.texture_dir),
      "stage2.synthetic.texture_dir",
      "is empty but textures include 'folder'; give a folder of texture images (e.g. DTD).",
    )
  require(config.pool_size >= 1, "pool_size", f"must be >= 1, got {config.pool_size}.")
  for name, section in (("stage2", config.stage2), ("eval", config.eval)):
    common.require_divides_devices(section.batch_size, f"{name}.batch_size")


def _stage1_config(config) -> ml_collections.ConfigDict:
  """The pre-training job of stage 1, from the MALA config."""
  stage = defaults.pretrain_config()
  for field in ("seed", "model", "data", "extra_data", "checkpoint_every", "keep_checkpoints"):
    stage[field] = config[field]
  stage.log_every = config.log_every
  stage.train = config.stage1
  stage.eval.enabled = False
  return stage


def _stage2_config(config) -> ml_collections.ConfigDict:
  stage = ml_collections.ConfigDict()
  for field in ("seed", "model", "data", "extra_data", "checkpoint_every", "log_every"):
    stage[field] = config[field]
  stage.train = config.stage2
  return stage


def _scoring_config(config, checkpoint: str) -> ml_collections.ConfigDict:
  """The zero-shot-shaped settings `run_category` reads."""
  scoring = defaults.zero_shot_config()
  scoring.data = config.eval.data
  scoring.model.checkpoint = checkpoint
  scoring.mask_ratio = config.eval.mask_ratio
  scoring.threshold = config.eval.threshold
  scoring.outputs = config.eval.outputs
  return scoring


def _evaluate(scoring: evaluation.Scoring, config, checkpoint: str, workdir: pathlib.Path):
  """Scores every test category with one detector into `workdir`; returns the summary."""
  scoring_config = _scoring_config(config, checkpoint)
  workdir.mkdir(parents=True, exist_ok=True)
  outcomes = {}
  for category in data.resolve_categories(config.eval.data):
    outcomes[category] = run_category(scoring, category, scoring_config, workdir)
    summary = run_report.summarize_outcomes(outcomes, config.eval.data.name)
    if jax.process_index() == 0:
      run_report.write_scores(workdir, outcomes)
      reports.write_metrics_json(workdir / "metrics.json", summary)
  return summary, outcomes


def _maeday_scoring(mae, params, config, key, mesh=None) -> evaluation.Scoring:
  """Zero-shot MAEDAY scoring of `mae` at the evaluation settings (images read at
  `eval.eval_size` and resized on device to the model's input)."""
  return evaluation.Scoring.create(
    mae,
    params,
    num_masks=config.eval.num_masks,
    mask_ratio=config.eval.mask_ratio,
    batch_size=config.eval.batch_size,
    key=key,
    image_size=config.eval.eval_size,
    eval_size=config.eval.eval_size,
    mesh=mesh,
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
  """Trains both stages (resuming), scores the test images; returns the summaries."""
  validate(config)
  data.resolve_categories(config.eval.data)  # Early error for a bad path or category.
  workdir = common.prepare_workdir(workdir, config)
  mae_checkpoint = str(config.model.checkpoint)
  result = {}
  if _stage1_enabled(config):
    result["stage1"] = pretrain_loop.run(_stage1_config(config), workdir / "stage1")
    mae_checkpoint = str(workdir / "stage1" / pretrain_loop.MODEL_DIR)
  result["stage2"] = stage2.run(_stage2_config(config), workdir / "stage2", mae_checkpoint)

  segmenter, params = stage2.load_segmenter(
    workdir / "stage2" / stage2.SEGMENTER_DIR, config.model.dtype, config.model.attention
  )
  mae = segmenter.mae
  key = jax.random.key(config.seed)
  base = _maeday_scoring(mae, params["mae"], config, key)
  mesh = base.mesh
  mala_scoring = base.with_function(
    segmenter_lib.make_scorer(segmenter, mesh, config.pool_size),
    parallel.replicate(params, mesh),
    mae.img_size,
  )
  summaries = {}
  summaries["MALA"], _ = _evaluate(mala_scoring, config, "MALA segmenter", workdir / "mala")
  if config.eval.maeday:
    stage1_mae, stage1_params = checkpoints.load_mae(
      mae_checkpoint,
      dtype=model_builder.compute_dtype(config.model.dtype),
      attention=config.model.attention,
    )
    maeday = _maeday_scoring(stage1_mae, stage1_params, config, key, mesh)
    name = f"MAEDAY (stage-1 MAE, {config.eval.num_masks} masks)"
    summaries[name], _ = _evaluate(maeday, config, mae_checkpoint, workdir / "maeday")
  if jax.process_index() == 0:
    table = _comparison_table(summaries)
    (workdir / "comparison.md").write_text(table)
    print(table)
    print(f"Outputs in {workdir}")
  result["evaluation"] = summaries
  return result

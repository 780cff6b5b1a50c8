"""The pretrain job: train (or continue) an MAE on normal images, export it, optionally score.

    python -m maeday_jax.main --config configs/pretrain.py --workdir runs/mae

The training itself is the library's `maeday_jax.pretrain.loop.train`; this job checks
the settings first, prepares the work directory (its `config.json`; a directory that
holds another run is refused) and prints where the results are.

Outputs under the work directory: checkpoints/ (a rerun of the same command resumes),
metrics.jsonl, training.png, model/ (`--config.model.checkpoint=<workdir>/model`),
summary.json, config.json.
"""

from __future__ import annotations

import jax
import ml_collections

from maeday_jax import data, model_builder, recipe_checks
from maeday_jax.config_errors import require
from maeday_jax.jobs import common
from maeday_jax.pretrain import loop


def check_data(config: ml_collections.ConfigDict) -> None:
  """Resolves every data source's categories, and the evaluation's, before training
  (an unknown category or a missing path fails now, not after the last step).

  Raises:
    DataError: naming the source and what is wrong.
  """
  for source in (config.data, *config.get("extra_data", [])):
    data.resolve_categories(source)
  if config.eval.enabled:
    data.resolve_categories(config.eval.data)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the settings that need no data before any long work starts.

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  model_builder.validate_model_config(config.model)
  common.validate_pretrain_train(config.train)
  common.validate_training_sources([config.data, *config.get("extra_data", [])], "data")
  for name in ("checkpoint_every", "keep_checkpoints", "log_every"):
    value = config.get(name, 1)
    require(value >= 1, name, f"must be >= 1, got {value}.")
  if config.eval.enabled:
    require(
      config.eval.num_masks >= 1, "eval.num_masks", f"must be >= 1, got {config.eval.num_masks}."
    )
    require(
      config.eval.batch_size >= 1,
      "eval.batch_size",
      f"must be >= 1, got {config.eval.batch_size}.",
    )
    common.require_divides_devices(config.eval.batch_size, "eval.batch_size")
    require(
      0.0 <= config.eval.mask_ratio < 1.0,
      "eval.mask_ratio",
      f"must be in [0, 1), got {config.eval.mask_ratio}.",
    )
    require(
      config.eval.split in recipe_checks.SPLITS,
      "eval.split",
      f"{config.eval.split!r} is not one of {', '.join(recipe_checks.SPLITS)}.",
    )
    require(
      config.eval.image_size >= 1,
      "eval.image_size",
      f"must be >= 1, got {config.eval.image_size}.",
    )


def _print_summary(summary: dict) -> None:
  loss = summary["final_loss"]
  print(
    f"Trained {summary['steps']} steps ({summary['epochs']} epochs on "
    f"{summary['num_images']} images); final loss "
    f"{'n/a' if loss is None else f'{loss:.4f}'}."
  )
  # The mean over the evaluated categories (`pretrain.evaluate_zero_shot`).
  for name, value in (summary.get("zero_shot") or {}).get("mean", {}).items():
    if isinstance(value, (int, float)):
      print(f"  zero-shot {name}: {value:.4f}")
  print(f"Model in {summary['model_dir']} (--config.model.checkpoint={summary['model_dir']})")
  print(f"Outputs in {summary['workdir']}")


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Checks `config`, prepares `workdir`, pre-trains (resuming); returns the summary."""
  validate(config)
  check_data(config)
  workdir = common.prepare_workdir(workdir, config)
  summary = loop.train(config, workdir)
  if jax.process_index() == 0:
    _print_summary(summary)
  return summary

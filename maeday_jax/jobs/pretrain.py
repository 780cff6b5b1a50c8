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

from maeday_jax import model_builder
from maeday_jax.config_errors import require
from maeday_jax.jobs import common
from maeday_jax.pretrain import loop
from maeday_jax.pretrain import step as step_lib


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the settings that need no data before any long work starts.

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  model_builder.validate_model_config(config.model)
  train = config.train
  require(train.batch_size >= 1, "train.batch_size", f"must be >= 1, got {train.batch_size}.")
  common.require_divides_devices(train.batch_size, "train.batch_size")
  require(
    (train.get("steps") or 0) > 0 or train.epochs > 0,
    "train.epochs",
    "is 0 and so is train.steps: set either to a positive value.",
  )
  require(
    train.loss in step_lib.LOSSES,
    "train.loss",
    f"{train.loss!r} is not one of {', '.join(step_lib.LOSSES)}.",
  )
  require(
    train.get("pixel_loss", "mse") in step_lib.PIXEL_LOSSES,
    "train.pixel_loss",
    f"{train.get('pixel_loss')!r} is not one of {', '.join(step_lib.PIXEL_LOSSES)}.",
  )
  require(
    config.checkpoint_every >= 1,
    "checkpoint_every",
    f"must be >= 1, got {config.checkpoint_every}.",
  )
  if config.eval.enabled:
    require(
      config.eval.num_masks >= 1, "eval.num_masks", f"must be >= 1, got {config.eval.num_masks}."
    )
    common.require_divides_devices(config.eval.batch_size, "eval.batch_size")


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
  workdir = common.prepare_workdir(workdir, config)
  summary = loop.train(config, workdir)
  if jax.process_index() == 0:
    _print_summary(summary)
  return summary

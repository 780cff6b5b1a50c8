"""Pieces every job shares: checking the scoring settings, logging; the work directory
(`jobs.workdir`) and the training recipes' checks (`maeday_jax.recipe_checks`) re-exported."""

import json
import logging
import pathlib

import ml_collections

from maeday_jax import defaults, evaluation, model_builder
from maeday_jax.config_errors import ConfigError, require
from maeday_jax.jobs.workdir import (
  WorkdirError,
  apply_pixel_budget,
  clear_workdir,
  prepare_workdir,
)
from maeday_jax.parallel import require_divides_devices
from maeday_jax.recipe_checks import (
  is_finite_number,
  validate_few_shot_train,
  validate_pretrain_train,
  validate_training_sources,
)

log = logging.getLogger("maeday_jax")


__all__ = [
  "ConfigError",
  "WorkdirError",
  "apply_pixel_budget",
  "clear_workdir",
  "describe_model",
  "prepare_workdir",
  "require",
  "require_divides_devices",
  "validate_few_shot_train",
  "validate_pretrain_train",
  "validate_scoring",
  "validate_threshold",
  "validate_training_sources",
]


def validate_scoring(config: ml_collections.ConfigDict) -> None:
  """Checks the scoring and model settings before any long work starts."""
  require(config.num_masks >= 1, "num_masks", f"must be >= 1, got {config.num_masks}.")
  require(
    0.0 <= config.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {config.mask_ratio}."
  )
  require(config.batch_size >= 1, "batch_size", f"must be >= 1, got {config.batch_size}.")
  require_divides_devices(config.batch_size, "batch_size")
  require(
    config.mask_batch_size >= 0,
    "mask_batch_size",
    f"must be >= 0 (0 = chosen from the device's memory), got {config.mask_batch_size}.",
  )
  require(
    config.get("masking", "random") in defaults.MASKINGS,
    "masking",
    f"{config.get('masking')!r} is not one of {', '.join(defaults.MASKINGS)}.",
  )
  require(
    config.eval_size >= 0,
    "eval_size",
    f"must be >= 0 (0 = the model's input size), got {config.eval_size}.",
  )
  original = config.get("eval_original_max_side", 0)
  require(
    isinstance(original, int) and original >= 0,
    "eval_original_max_side",
    f"must be >= 0 (0 = off: pixel metrics at eval_size), got {original!r}.",
  )
  validate_threshold(config.threshold, config.data)
  model_builder.validate_model_config(config.model)
  model_builder.validate_masking(config, config.model)


def validate_threshold(
  threshold: ml_collections.ConfigDict, data: ml_collections.ConfigDict, field: str = "threshold"
) -> None:
  """Checks a scoring job's `threshold` section (`field` names it in messages) against
  the images it will score (`data`).

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  require(
    threshold.method in evaluation.THRESHOLD_METHODS,
    f"{field}.method",
    f"{threshold.method!r} is not one of {', '.join(evaluation.THRESHOLD_METHODS)}.",
  )
  require(
    is_finite_number(threshold.percentile) and 0.0 <= threshold.percentile <= 100.0,
    f"{field}.percentile",
    f"must be in [0, 100], got {threshold.percentile}.",
  )
  if threshold.method == "fixed":
    # NaN compares false with every score (nothing is ever flagged), inf flags nothing
    # or everything: refused now, not after scoring.
    require(
      is_finite_number(threshold.value),
      f"{field}.value",
      f"must be a finite number with {field}.method=fixed, got {threshold.value}.",
    )
  if threshold.method == "percentile" and data.name == "folder":
    require(
      bool(data.normal_path),
      f"{field}.method",
      "'percentile' needs normal reference images: set --config.data.normal_path to a "
      "folder of normal images, or choose another method (f1, fixed, none).",
    )


def write_json(path: pathlib.Path, payload) -> None:
  path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))


def describe_model(model, mesh, categories) -> None:
  log.info(
    "Model: %dpx, patch %d, encoder %dx%d, decoder %dx%d; %d devices; categories: %s",
    model.img_size,
    model.patch_size,
    model.embed_dim,
    model.depth,
    model.decoder_embed_dim,
    model.decoder_depth,
    mesh.devices.size,
    ", ".join(categories),
  )

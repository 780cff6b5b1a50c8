"""Pieces every job shares: checking the scoring settings, the work directory, logging."""

import json
import logging
import os
import pathlib

import jax
import ml_collections

from maeday_jax import defaults, evaluation, model_builder
from maeday_jax.config_errors import ConfigError, require

log = logging.getLogger("maeday_jax")

__all__ = ["ConfigError", "describe_model", "prepare_workdir", "require", "validate_scoring"]


def validate_scoring(config: ml_collections.ConfigDict) -> None:
  """Checks the scoring and model settings before any long work starts."""
  require(config.num_masks >= 1, "num_masks", f"must be >= 1, got {config.num_masks}.")
  require(
    0.0 <= config.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {config.mask_ratio}."
  )
  require(config.batch_size >= 1, "batch_size", f"must be >= 1, got {config.batch_size}.")
  require(
    config.threshold.method in evaluation.THRESHOLD_METHODS,
    "threshold.method",
    f"{config.threshold.method!r} is not one of {', '.join(evaluation.THRESHOLD_METHODS)}.",
  )
  model_builder.validate_model_config(config.model)


def load_model(model_config: ml_collections.ConfigDict, seed: int):
  """(model, params) for a scoring job; warns loudly about random weights."""
  if model_config.checkpoint == defaults.RANDOM_WEIGHTS:
    log.warning(
      "Using RANDOM weights (model.checkpoint='random', variant %r): maps are meaningless "
      "except for smoke tests.",
      model_config.variant,
    )
  model, params, _ = model_builder.build_model(model_config, jax.random.key(seed))
  return model, params


def prepare_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Creates the work directory and writes the resolved config into it."""
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  return workdir


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

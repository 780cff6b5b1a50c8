"""Pieces every job shares: checking the scoring settings, the work directory, logging."""

import json
import logging
import os
import pathlib
import shutil

import jax
import ml_collections

from maeday_jax import atomic_files, defaults, evaluation, model_builder, parallel
from maeday_jax.config_errors import ConfigError, require
from maeday_jax.parallel import require_divides_devices

log = logging.getLogger("maeday_jax")

__all__ = [
  "ConfigError",
  "WorkdirError",
  "clear_workdir",
  "describe_model",
  "prepare_workdir",
  "require",
  "require_divides_devices",
  "validate_scoring",
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
  threshold = config.threshold
  require(
    threshold.method in evaluation.THRESHOLD_METHODS,
    "threshold.method",
    f"{threshold.method!r} is not one of {', '.join(evaluation.THRESHOLD_METHODS)}.",
  )
  require(
    0.0 <= threshold.percentile <= 100.0,
    "threshold.percentile",
    f"must be in [0, 100], got {threshold.percentile}.",
  )
  if threshold.method == "percentile" and config.data.name == "folder":
    require(
      bool(config.data.normal_path),
      "threshold.method",
      "'percentile' needs normal reference images: set --config.data.normal_path to a "
      "folder of normal images, or choose another method (f1, fixed, none).",
    )
  model_builder.validate_model_config(config.model)


class WorkdirError(ConfigError):
  """The work directory holds another run; the message says how to proceed."""


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  fields = []
  for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      fields += _config_differences(a, b, f"{prefix}{key}.")
    elif a != b:
      fields.append(f"{prefix}{key}")
  return fields


def prepare_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Creates the work directory and writes the resolved config into it.

  A work directory holds one run: an empty or new one is used, one whose `config.json`
  is this configuration is the same run (rerunning it rewrites the same outputs), and
  anything else is refused, so that outputs of two runs never mix.

  Raises:
    WorkdirError: the directory holds files of another run, or files that are no run's.
  """
  workdir = pathlib.Path(workdir).expanduser()
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if workdir.is_dir() and any(workdir.iterdir()):
    previous = workdir / "config.json"
    how = "Use a new --workdir, or add --overwrite to clear this one."
    if not previous.is_file():
      raise WorkdirError(
        f"--workdir {workdir} is not empty and holds no config.json: it is not a "
        "maeday_jax work directory. Use a new or empty --workdir."
      )
    old = json.loads(previous.read_text())
    fields = _config_differences(old, json.loads(text))
    if fields:
      shown = ", ".join(fields[:8]) + (" ..." if len(fields) > 8 else "")
      raise WorkdirError(
        f"--workdir {workdir} holds another run (its config.json differs in {shown}); "
        f"its outputs would mix with this run's. {how}"
      )
    log.info("%s holds this same run; its outputs are rewritten.", workdir)
  # Every process has checked the directory as it was before anyone writes into it.
  parallel.barrier(f"maeday_jax: checked the work directory {workdir}")
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic_files.write_text(workdir / "config.json", text)
  parallel.barrier(f"maeday_jax: prepared the work directory {workdir}")
  return workdir


def clear_workdir(workdir: str | os.PathLike) -> None:
  """Deletes a maeday_jax work directory's contents (`--overwrite`); never another folder.

  Raises:
    WorkdirError: the folder is not empty and has no config.json (not a work directory).
  """
  workdir = pathlib.Path(workdir).expanduser()
  if jax.process_index() == 0 and workdir.is_dir() and any(workdir.iterdir()):
    if not (workdir / "config.json").is_file():
      raise WorkdirError(
        f"--overwrite: {workdir} holds no config.json, so it is not a maeday_jax work "
        "directory; it is left untouched. Use a new or empty --workdir."
      )
    for child in workdir.iterdir():
      if child.is_dir() and not child.is_symlink():
        shutil.rmtree(child)
      else:
        child.unlink()
  parallel.barrier(f"maeday_jax: cleared {workdir}")


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

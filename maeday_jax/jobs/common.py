"""Pieces every job shares: model loading from the config, the work directory, logging."""

import json
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from maeday_jax import checkpoints, models

log = logging.getLogger("maeday_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and what to set."""


def require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"--config.{field}: {message}")


def model_config() -> ml_collections.ConfigDict:
  """Model settings shared by the jobs.

  Fields:
    checkpoint: a known name (mae_vit_base, mae_vit_large, mae_vit_huge,
      mae_vit_large_ganloss), a local .pth / .safetensors file, a converted directory, or
      'random' for randomly initialised weights of `variant` (smoke tests only).
    variant: architecture for checkpoint='random' (base, large, huge, small, test).
    num_heads, decoder_num_heads: override inferred head counts (0 = infer).
    dtype: compute dtype, 'float32' (default) or 'bfloat16' (accelerators).
    cache_dir: download/conversion cache ('' = $MAEDAY_CACHE_DIR or ~/.cache/maeday_jax).
  """
  return ml_collections.ConfigDict(
    dict(
      checkpoint="mae_vit_large",
      variant="test",
      num_heads=0,
      decoder_num_heads=0,
      dtype="float32",
      cache_dir="",
    )
  )


def load_model(config: ml_collections.ConfigDict, seed: int = 0):
  """(model, params) from `config.model`; fails early with the path/URL and the override."""
  require(
    config.dtype in DTYPES, "model.dtype", f"{config.dtype!r} is not one of {sorted(DTYPES)}."
  )
  dtype = DTYPES[config.dtype]
  if config.checkpoint == "random":
    require(
      config.variant in models.VARIANTS,
      "model.variant",
      f"{config.variant!r} is not one of {sorted(models.VARIANTS)}.",
    )
    log.warning(
      "Using RANDOM weights (model.checkpoint='random', variant %r): maps are meaningless "
      "except for smoke tests.",
      config.variant,
    )
    model = models.create(config.variant, dtype=dtype)
    return model, models.init_params(model, jax.random.key(seed))
  try:
    return checkpoints.load_mae(
      config.checkpoint,
      num_heads=config.num_heads or None,
      decoder_num_heads=config.decoder_num_heads or None,
      dtype=dtype,
      cache_dir=config.cache_dir or None,
    )
  except checkpoints.CheckpointError as e:
    raise checkpoints.CheckpointError(
      f"{e}\n(set the checkpoint with --config.model.checkpoint=PATH_OR_NAME)"
    ) from e


def prepare_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Creates the work directory and writes the resolved config into it."""
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  return workdir


def write_json(path: pathlib.Path, payload) -> None:
  path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))

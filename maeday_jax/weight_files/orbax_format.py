"""The project's own converted checkpoint format: an Orbax tree plus the architecture.

Layout of a converted directory::

  <dir>/mae_config.json   architecture (MaskedAutoencoder fields) and provenance
  <dir>/params/           Orbax StandardCheckpointer tree of float32 parameters

Restoring needs no pickle and no renaming, so it is the fast path for repeated runs.
"""

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from maeday_jax import parallel
from maeday_jax.weight_files.errors import CheckpointError

CONFIG_FILE = "mae_config.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1


def is_converted(path: str | os.PathLike) -> bool:
  path = pathlib.Path(path)
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def save(directory: str | os.PathLike, arch: dict, params, source: str = "") -> pathlib.Path:
  """Writes `params` and the architecture `arch` to `directory` (must not exist yet).

  With several JAX processes every process calls this with the same parameters (Orbax
  saves collectively); process 0 creates the directory and writes the config.
  """
  directory = pathlib.Path(directory).expanduser().absolute()
  if directory.exists() and any(directory.iterdir()):
    raise FileExistsError(f"{directory} already exists and is not empty; choose a new path.")
  primary = jax.process_index() == 0
  parallel.barrier(f"maeday_jax: checked {directory}")  # Before anyone writes into it.
  if primary:
    directory.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, params)
  checkpointer.wait_until_finished()
  if primary:
    config = {"format_version": FORMAT_VERSION, "architecture": arch, "source": source}
    # Written last: a directory with a config file holds a complete parameter tree.
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
  parallel.barrier(f"maeday_jax: saved {directory}")
  return directory


def load_architecture(directory: str | os.PathLike) -> dict:
  path = pathlib.Path(directory) / CONFIG_FILE
  try:
    config = json.loads(path.read_text())
    return dict(config["architecture"])
  except (OSError, ValueError, KeyError) as e:
    raise CheckpointError(f"{path}: unreadable converted-checkpoint config ({e}).") from e


def load_params(directory: str | os.PathLike, abstract_params):
  """Restores the parameter tree, checked against the model's expected shapes."""
  path = pathlib.Path(directory).expanduser().absolute() / PARAMS_DIR
  try:
    return ocp.StandardCheckpointer().restore(path, abstract_params)
  except Exception as e:  # Orbax raises many types; all mean the same to a user.
    raise CheckpointError(
      f"{path}: could not restore the converted parameters ({type(e).__name__}: {e}). "
      "Re-create the directory with tools/convert_checkpoint.py."
    ) from e

"""The work directory of a job: one run per folder, created and recorded once, cleared only
when it is a maeday_jax work directory; and the per-image pixel budget a run decodes with."""

import json
import logging
import os
import pathlib
import shutil

import jax
import ml_collections

from maeday_jax import atomic_files, parallel
from maeday_jax.config_errors import ConfigError, require
from maeday_jax.data import images

log = logging.getLogger("maeday_jax")


class WorkdirError(ConfigError):
  """The work directory holds another run; the message says how to proceed."""


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
  """The fields whose values differ. A field the old config.json lacks was added by a
  newer maeday_jax, not changed by the user: the run is still the same run."""
  fields = []
  for key in sorted(old.keys() | new.keys()):
    if key not in old:
      continue
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      fields += _config_differences(a, b, f"{prefix}{key}.")
    elif a != b:
      fields.append(f"{prefix}{key}")
  return fields


def apply_pixel_budget(config: ml_collections.ConfigDict) -> None:
  """Sets the per-image pixel budget of every image this process decodes from
  `config.data.max_image_pixels` and `config.data.num_workers` (`data.images`); a job
  without a `data` section keeps the default.

  Raises:
    ConfigError: the setting is negative.
  """
  data_config = config.get("data")
  if data_config is None:
    return
  pixels = data_config.get("max_image_pixels", 0) or 0
  require(
    pixels >= 0,
    "data.max_image_pixels",
    f"must be >= 0 (0 = ${images.PIXEL_BUDGET_ENV} or derived from memory), got {pixels}.",
  )
  threads = max(1, int(data_config.get("num_workers", images.DEFAULT_DECODING_THREADS) or 1))
  budget = images.set_pixel_budget(int(pixels), threads=threads)
  log.info("Images of more than %d pixels are skipped (the per-image pixel budget).", budget)


def prepare_workdir(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Creates the work directory and writes the resolved config into it.

  A work directory holds one run: an empty or new one is used, one whose `config.json`
  is this configuration is the same run (rerunning it rewrites the same outputs), and
  anything else is refused, so that outputs of two runs never mix.

  Raises:
    WorkdirError: the directory holds files of another run, or files that are no run's.
  """
  # Every job comes here before it reads an image: the pixel budget is set first.
  apply_pixel_budget(config)
  workdir = pathlib.Path(workdir).expanduser()
  _require_folder(workdir, "--workdir")
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if workdir.is_dir() and any(workdir.iterdir()):
    previous = workdir / "config.json"
    how = "Use a new --workdir, or add --overwrite to clear this one."
    if not previous.is_file():
      raise WorkdirError(
        f"--workdir {workdir} is not empty and holds no config.json: it is not a "
        "maeday_jax work directory. Use a new or empty --workdir."
      )
    try:
      old = json.loads(previous.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise WorkdirError(
        f"--workdir {workdir}: its config.json cannot be read as a run's configuration ({e}). {how}"
      ) from e
    if not isinstance(old, dict):
      raise WorkdirError(
        f"--workdir {workdir}: its config.json is not a run's configuration. {how}"
      )
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
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      atomic_files.write_text(workdir / "config.json", text)
    except OSError as e:  # Read-only, a file in the path, no space: the user's to fix.
      raise WorkdirError(f"--workdir {workdir}: cannot write there ({e}).") from e
  parallel.barrier(f"maeday_jax: prepared the work directory {workdir}")
  return workdir


def _require_folder(workdir: pathlib.Path, what: str, after: str = "") -> None:
  """Refuses a work directory path that names a file (or lies under one)."""
  for path in (workdir, *workdir.parents):
    if path.exists() and not path.is_dir():
      where = "is" if path == workdir else f"lies under {path}, which is"
      raise WorkdirError(
        f"{what} {workdir} {where} a file, not a folder.{after} Give a new or empty "
        "folder as --workdir."
      )
    if path.exists():
      return


def clear_workdir(workdir: str | os.PathLike) -> None:
  """Deletes a maeday_jax work directory's contents (`--overwrite`); never another folder.

  Raises:
    WorkdirError: the folder is not empty and has no config.json (not a work directory).
  """
  workdir = pathlib.Path(workdir).expanduser()
  _require_folder(workdir, "--overwrite: --workdir", " It is left untouched.")
  if jax.process_index() == 0 and workdir.is_dir() and any(workdir.iterdir()):
    if not (workdir / "config.json").is_file():
      raise WorkdirError(
        f"--overwrite: {workdir} holds no config.json, so it is not a maeday_jax work "
        "directory; it is left untouched. Use a new or empty --workdir."
      )
    from maeday_jax.bulk import lock

    # A run using the folder holds its lock: never delete its files under it.
    fd, error = lock.acquire(workdir / lock.LOCK_FILE)
    if error:
      raise lock.WorkdirLocked(f"--overwrite: {error}")
    try:
      for child in workdir.iterdir():
        # The lock file too, last: a run that opens it meanwhile locks a new file.
        if child.is_dir() and not child.is_symlink():
          shutil.rmtree(child)
        elif child.name != lock.LOCK_FILE:
          child.unlink()
      (workdir / lock.LOCK_FILE).unlink(missing_ok=True)
    finally:
      lock.release(fd)
  parallel.barrier(f"maeday_jax: cleared {workdir}")

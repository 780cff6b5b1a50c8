"""Command line: `python -m maeday_jax.main --config configs/<job>.py --workdir DIR`.

Every job is an importable `run(config, workdir)` function; this file only parses flags.
"""

import importlib
import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from maeday_jax import cpu_limits
from maeday_jax.checkpoints import CheckpointError
from maeday_jax.config_errors import ConfigError
from maeday_jax.data import DataError
from maeday_jax.download import DownloadError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/latest", "Directory for all outputs.")
_OVERWRITE = flags.DEFINE_bool(
  "overwrite",
  False,
  "Clear --workdir first when it holds another run (only a maeday_jax work directory, "
  "one with a config.json, is ever cleared).",
)
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "Several hosts (TPU pod slices, Slurm, Open MPI): call jax.distributed.initialize() "
  "first, which finds the other processes from the environment. Run the same command "
  "on every host.",
)


# `config.job` -> the module whose `run(config, workdir)` runs it.
JOBS = ("fit", "evaluate", "score", "zero_shot", "few_shot", "pretrain", "mala")


def _job(name: str):
  if name not in JOBS:
    raise ConfigError(f"--config.job: unknown job {name!r} ({', '.join(JOBS)}).")
  return importlib.import_module(f"maeday_jax.jobs.{name}")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  # tfds logs every prepared file through absl at INFO; keep the console for our progress.
  absl_logging.set_verbosity(absl_logging.WARNING)
  # ... which also raises the root logger to WARNING: keep this library's own INFO lines
  # (what is trained, resumed, chosen).
  logging.getLogger("maeday_jax").setLevel(logging.INFO)
  config = _CONFIG.value
  cpu_limits.fit_to_quota()  # Before JAX starts: XLA:CPU sizes its threads from this.
  if _DISTRIBUTED.value:
    import jax

    jax.distributed.initialize()
  try:
    if _OVERWRITE.value:
      from maeday_jax.jobs import common

      common.clear_workdir(_WORKDIR.value)
    _job(config.job).run(config, _WORKDIR.value)
  except (CheckpointError, DataError, DownloadError, ConfigError) as e:
    # Input problems get their message, not a traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    # Every finished category is already in scores.csv and metrics.json.
    print(
      f"\nInterrupted. The categories finished so far are in {_WORKDIR.value} (scores.csv, "
      "metrics.json); run the same command again to redo the rest.",
      file=sys.stderr,
    )
    sys.exit(130)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)

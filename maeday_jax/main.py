"""Command line: `python -m maeday_jax.main --config configs/<job>.py --workdir DIR`.

Every job is an importable `run(config, workdir)` function; this file only parses flags.
"""

import sys

from maeday_jax import cpu_memory

if __name__ == "__main__":
  # First of all: the command may start again, once, with malloc keeping XLA's buffers
  # between steps (`cpu_memory`), before the imports below cost their second or two.
  cpu_memory.reexec_with_kept_memory()

import importlib
import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from maeday_jax import command_line, cpu_limits
from maeday_jax.checkpoints import CheckpointError
from maeday_jax.config_errors import ConfigError
from maeday_jax.data import DataError
from maeday_jax.download import DownloadError
from maeday_jax.run_errors import RunFailed

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
JOBS = (
  "fit",
  "evaluate",
  "score",
  "export",
  "zero_shot",
  "few_shot",
  "pretrain",
  "mala",
  "pmad",
)


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
  job = None
  try:
    if _OVERWRITE.value:
      from maeday_jax.jobs import common

      common.clear_workdir(_WORKDIR.value)
    job = _job(config.job)
    job.run(config, _WORKDIR.value)
  except (CheckpointError, DataError, DownloadError, ConfigError, RunFailed) as e:
    # Input problems (and a run whose failed parts are listed) get their message, not a
    # traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    # A job that keeps its work otherwise says what it keeps (`interrupted_message`); the
    # others have every finished category in scores.csv and metrics.json already.
    message = getattr(job, "interrupted_message", None)
    if message is not None:
      print(f"\n{message(_WORKDIR.value)}", file=sys.stderr)
    else:
      print(
        f"\nInterrupted. The categories finished so far are in {_WORKDIR.value} (scores.csv, "
        "metrics.json); run the same command again to redo the rest.",
        file=sys.stderr,
      )
    sys.exit(130)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flag parser: absl's, with every command-line mistake (a misspelt
  `--config.<field>`, a value of the wrong type, an unknown flag, a config file that does
  not load) reported as one `error:` line and exit status 2 instead of a traceback.

  ml_collections raises a bare KeyError or AttributeError for a field the config lacks,
  which absl's own parser does not catch: a typo in an override then ended in a traceback.
  """
  try:
    remaining = flags.FLAGS(argv)
    # A config file that does not load is reported only when the config is first read.
    _CONFIG.value.get("job")
    return remaining
  except Exception as e:  # Whatever the flag parsers raise: the command line is wrong.
    message = command_line.explain(argv, e, flags.FLAGS["config"].parser.parse)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)

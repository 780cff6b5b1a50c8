"""What was wrong with a command line, in one line: a misspelt `--config.<field>` (with the
nearest field the config has), a config file that is missing or does not load, a value of
the wrong type, an unknown flag. `maeday_jax.main` prints it as `error: ...`."""

import difflib
import os
import re
from collections.abc import Callable

from ml_collections import config_dict


def explain(argv: list[str], error: Exception, parse_config: Callable[[str], object]) -> str:
  """The one-line message for a command line whose flags did not parse (`error`).

  `parse_config(spec)` loads a `--config` file spec (absl's config-file flag parser).
  """
  spec = _config_spec(argv)
  if spec and not os.path.isfile(spec.split(":", 1)[0]):
    return f"--config={spec}: no such config file ({', '.join(_config_files())})."
  return _misspelt_field(argv, parse_config) or _one_line(error)


def _config_spec(argv: list[str]) -> str | None:
  """The value of `--config` on the command line (`--config=F` or `--config F`)."""
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(=(.*))?$", arg)
    if match:
      return match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _field_names(node: config_dict.ConfigDict, prefix: str = ""):
  """Every field of a config, sections included, as dotted names ('train.lora.rank')."""
  for key in node:
    yield prefix + key
    if isinstance(node[key], config_dict.ConfigDict):
      yield from _field_names(node[key], f"{prefix}{key}.")


def _unknown_field(config: config_dict.ConfigDict, path: str) -> bool:
  node = config
  for part in path.split("."):
    if not isinstance(node, config_dict.ConfigDict):
      return False  # Inside a list or a value: ml_collections says what is wrong.
    if part not in node:
      return True
    node = node[part]
  return False


def _misspelt_field(argv: list[str], parse_config) -> str | None:
  """The message for the first `--config.<field>` override the config does not have,
  naming the nearest field it has, or None when every override names a field."""
  spec = _config_spec(argv)
  overrides = [m.group(2) for arg in argv if (m := re.match(r"^--?(no)?config\.([^=]+)", arg))]
  if not spec or not overrides:
    return None
  try:
    config = parse_config(spec)
  except Exception:  # The file itself is the problem: its own message says so.
    return None
  if not isinstance(config, config_dict.ConfigDict):
    return None
  for path in overrides:
    if _unknown_field(config, path):
      close = difflib.get_close_matches(path, list(_field_names(config)), n=1)
      if close:
        return f"--config.{path}: no such field; did you mean --config.{close[0]}?"
      return f"--config.{path}: no such field in {spec}."
  return None


def _config_files() -> list[str]:
  """The job config files beside this package (`configs/*.py`), for messages."""
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  names = (
    sorted(n for n in os.listdir(folder) if n.endswith(".py")) if os.path.isdir(folder) else []
  )
  return [f"configs/{n}" for n in names if not n.startswith("_")] or ["configs/<job>.py"]


def _one_line(error: Exception) -> str:
  """A flag parser's message on one line; of a config file's own traceback (which
  ml_collections pastes into its message), only the exception it ends with."""
  text = str(error)
  if "Traceback (most recent call last)" in text:
    head = text.split("\n", 1)[0].split(": Error whilst parsing", 1)[0]
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    text = f"{head}: {last}"
  return " ".join(text.split()).removeprefix("flag ")

"""The detectors by name: one line per method.

    cls = registry.get("patchcore")          # the Detector class
    detector = registry.create("patchcore", config)
    registry.names()                         # every known method

`register` adds a method at run time (a research team's own detector, or a test's).
"""

from __future__ import annotations

import importlib

import ml_collections

from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors.base import Detector
from maeday_jax.settings import tiling as tiling_settings

# name -> "module:Class". Modules are imported on first use (see `base`).
METHODS: dict[str, str] = {
  "maeday": "maeday_jax.detectors.maeday:ZeroShotMaeday",
  "maeday_lora": "maeday_jax.detectors.maeday_few_shot:LoraMaeday",
  "maeday_full": "maeday_jax.detectors.maeday_few_shot:FullFineTuneMaeday",
  "mae": "maeday_jax.detectors.mae:PretrainedMaeday",
  "patchcore": "maeday_jax.detectors.patchcore:PatchCore",
  "patchcore_x2": "maeday_jax.detectors.ensemble:PatchCoreX2",
  "ensemble": "maeday_jax.detectors.ensemble:Ensemble",
  "mala": "maeday_jax.detectors.mala:Mala",
  "anomalydino": "maeday_jax.detectors.anomalydino:AnomalyDino",
  "musc": "maeday_jax.detectors.musc:Musc",
  "clip_zero_shot": "maeday_jax.detectors.clip_zero_shot:ClipZeroShot",
  "april_gan": "maeday_jax.detectors.april_gan:AprilGan",
  "pmad": "maeday_jax.detectors.pmad:Pmad",
}

_CLASSES: dict[str, type[Detector]] = {}
TILING = "tiling"  # The section every detector reads (`maeday_jax.tiling`).


def names() -> list[str]:
  """Every registered method, in registration order."""
  return list(METHODS)


def register(name: str, cls: type[Detector] | str) -> None:
  """Adds (or replaces) the method `name`: a Detector class or a "module:Class" path."""
  METHODS[name] = cls if isinstance(cls, str) else f"{cls.__module__}:{cls.__qualname__}"
  _CLASSES.pop(name, None)
  if not isinstance(cls, str):
    _CLASSES[name] = cls


def unregister(name: str) -> None:
  """Removes a method added with `register`."""
  METHODS.pop(name, None)
  _CLASSES.pop(name, None)


def check_name(name: str, field: str = "detector") -> str:
  """`name` if it is a registered method.

  Raises:
    ConfigError: naming the field and listing the known methods.
  """
  if name not in METHODS:
    raise ConfigError(
      f"--config.{field}: unknown detector {name!r}; the known detectors are "
      f"{', '.join(names())} (or give the path of a fitted detector folder)."
    )
  return name


def get(name: str) -> type[Detector]:
  """The Detector class registered as `name`."""
  check_name(name)
  if name not in _CLASSES:
    module, _, attribute = METHODS[name].partition(":")
    _CLASSES[name] = getattr(importlib.import_module(module), attribute)
  return _CLASSES[name]


def create(name: str, config: ml_collections.ConfigDict) -> Detector:
  """A new (unfitted) detector of method `name` with its settings taken from `config`."""
  cls = get(name)
  return cls(settings_of(cls, config))


def settings_of(cls: type[Detector], config: ml_collections.ConfigDict):
  """The part of a job config a method reads: its sections (defaults where the config
  lacks one), plus `seed` and `tiling`, which every detector reads."""
  settings = ml_collections.ConfigDict()
  settings.seed = int(config.get("seed", 0))
  defaults = None
  for section in [*cls.sections(config), TILING]:
    if section in config:
      value = config[section]
    else:
      defaults = all_sections() if defaults is None else defaults
      value = defaults[section]
    if isinstance(value, ml_collections.ConfigDict):
      value = ml_collections.ConfigDict(value.to_dict())
    settings[section] = value
  return settings


def validate_tiling(cls: type[Detector], config: ml_collections.ConfigDict) -> None:
  """Checks a job config's `tiling` section for method `cls` before any work.

  Raises:
    ConfigError: an invalid field, or tiles asked of a transductive method.
  """
  section = config.get(TILING)
  if section is None:
    return
  for field, message in tiling_settings.problems(section):
    raise ConfigError(f"--config.tiling.{field}: {message}")
  if section.get("mode", "none") == "none":
    return
  if cls.scores_groups(config):
    raise ConfigError(
      f"--config.tiling.mode: {cls.method} scores images against each other; it cannot "
      "score tiles yet. Use --config.tiling.mode=none."
    )


def all_sections() -> dict:
  """Every registered method's sections with their defaults, plus `tiling` (every
  detector's), for the job configs.

  Raises:
    ValueError: two methods declare one section with different defaults.
  """
  sections: dict = {TILING: tiling_settings.tiling_config()}
  owners: dict[str, str] = {}
  for name in names():
    for section, value in get(name).default_sections().items():
      if section in sections and _plain(sections[section]) != _plain(value):
        raise ValueError(
          f"detectors {owners[section]} and {name} declare the section {section!r} with "
          "different defaults."
        )
      sections.setdefault(section, value)
      owners.setdefault(section, name)
  return sections


def _plain(value):
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value

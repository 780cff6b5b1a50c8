"""The error every job raises for a configuration value it cannot use."""


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and what to set."""


def require(condition: bool, field: str, message: str) -> None:
  """Raises `ConfigError('--config.<field>: <message>')` unless `condition` holds."""
  if not condition:
    raise ConfigError(f"--config.{field}: {message}")

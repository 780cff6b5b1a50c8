"""The one exception type raised for every unusable checkpoint."""


class CheckpointError(ValueError):
  """A checkpoint could not be used; the message names the file and what to do."""

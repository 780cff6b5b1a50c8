"""The one exception type raised for every unusable checkpoint (downloads that fail raise
`maeday_jax.download.DownloadError`)."""


class CheckpointError(ValueError):
  """A checkpoint could not be used; the message names the file and what to do."""

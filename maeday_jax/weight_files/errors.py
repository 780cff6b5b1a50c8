"""The one exception type raised for every unusable checkpoint or weights file.

Downloads that fail raise `maeday_jax.download.DownloadError` instead. Every loader
(`models.mae_import`, `models.resnet_import`, the weights resolver `models.weights`) and
every facade (`checkpoints.CheckpointError`, `backbones.CheckpointError`) raises or
re-exports this class, so one handler catches them all.
"""

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
  """A checkpoint could not be used; the message names the file and what to do."""

"""The error a job raises at its end when part of its work failed and the rest is written.

Light (no imports), so that `maeday_jax.main` can catch it without loading any job.
"""


class RunFailed(Exception):
  """Some of a run's work failed (e.g. one method of a few-shot run diverged) while the
  rest finished and is written; the message lists what failed and why."""

"""Shared test set-up: simulate 8 CPU devices before JAX initialises."""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@pytest.fixture(scope="session")
def mt_sample_dir() -> pathlib.Path:
  """The real magnetic-tile sample, when ../shared is beside the checkout."""
  path = SHARED_DATA / "mt_sample"
  if not path.is_dir():
    pytest.skip(f"{path} not found (only present on developer/CI machines)")
  return path


def kill_at_step(monkeypatch, step: int, run) -> None:
  """Calls `run()` with the training batch of `step` raising KeyboardInterrupt (a kill
  after the previous checkpoint), then restores the batch function."""
  from maeday_jax.pretrain import inputs

  real = inputs.batch_indices

  def killed(num, batch, at, seed):
    if at == step:
      raise KeyboardInterrupt("simulated kill")
    return real(num, batch, at, seed)

  monkeypatch.setattr(inputs, "batch_indices", killed)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(inputs, "batch_indices", real)

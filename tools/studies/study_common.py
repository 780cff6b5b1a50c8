"""What the studies share: where their inputs are by default, and how they load them.

Both studies run from the checkout (`python tools/studies/<study>.py ...`), which puts
this folder on `sys.path`; `maeday_jax` must be installed (or the checkout root on
`PYTHONPATH`).
"""

from __future__ import annotations

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The shared magnetic-tile sample beside the checkout: 24 normal and 40 defective tiles.
MT_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "mt_sample"
# `--model fixture`: the parity fixtures' random-weight MAE (32 px, patch 8).
FIXTURE_MAE = REPO_ROOT / "tests" / "fixtures" / "mae_ref_a.pth"


def load_model(name: str, dtype=None):
  """(model, params) of `name`: anything `load_mae` accepts, or 'fixture'."""
  import jax.numpy as jnp

  from maeday_jax import checkpoints

  path = FIXTURE_MAE if name == "fixture" else name
  return checkpoints.load_mae(path, dtype=jnp.float32 if dtype is None else dtype)


def data_config(name: str, path: str):
  """`config.data` for dataset `name` read from `path` (prepared under the default
  data_dir)."""
  from maeday_jax import data

  config = data.get_data_config()
  config.name, config.path = name, str(path)
  return config

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


def evaluate_detector(detector, data_fields: dict, workdir, eval_size: int = 224) -> dict:
  """Image AUROC, pixel AUROC and AUPRO of a fitted detector (or its folder) on the
  dataset `data_fields` (`config.data` fields), scored as the evaluate job scores (pixel
  metrics at `eval_size`); the run's outputs go to `workdir`."""
  import json

  from maeday_jax import data, defaults, detectors
  from maeday_jax.jobs import detector_choice, run_report

  config = defaults.evaluate_config()
  config.data.update(data_fields)
  config.eval_size = eval_size
  config.outputs.overlays = False
  config.outputs.panels = 0
  config.outputs.reconstructions = 0
  if isinstance(detector, (str, pathlib.Path)):
    detector = detectors.load(detector)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  scoring = detector_choice.scoring(detector, config)
  categories = data.resolve_categories(config.data)
  run_report.evaluate_categories(scoring, config, workdir, categories, "zero_shot")
  metrics = json.loads((workdir / "metrics.json").read_text())
  mean = metrics["groups"]["all"]["mean"]
  return {k: mean.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}

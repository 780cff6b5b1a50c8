"""Pixel metrics at each mask's original size (`eval_original_max_side`): equal to
scikit-learn's AUROC over the maps resized (by Pillow, here) to the masks read from disk,
for non-square images of several sizes, and with the longer side capped."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from maeday_jax import defaults, metrics
from maeday_jax.jobs import evaluate as evaluate_job

SIZES = [(48, 64), (60, 40), (52, 52), (40, 72)]  # (height, width), all different.


def _write(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("full_res")
  rng = np.random.default_rng(0)
  for i in range(4):
    _write(root / "normal" / f"n{i}.png", rng.integers(60, 180, (48, 48, 3), dtype=np.uint8))
  for i, (h, w) in enumerate(SIZES):
    image = rng.integers(60, 180, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    if i % 2:  # Two anomalous images with a bright rectangle of their own shape.
      mask[h // 4 : h // 2, w // 3 : w // 3 + 9] = 255
      image[mask > 0] = 250
    _write(root / "images" / f"t{i}.png", image)
    _write(root / "masks" / f"t{i}.png", mask)
  return root


def _evaluate(dataset, workdir, max_side: int) -> dict:
  config = defaults.evaluate_config("runlocal")
  config.detector = "maeday"
  config.data.update(
    {
      "name": "folder",
      "path": str(dataset / "images"),
      "normal_path": str(dataset / "normal"),
      "mask_path": str(dataset / "masks"),
      "data_dir": str(workdir.parent / "tfds"),
      "num_workers": 2,
    }
  )
  config.eval_original_max_side = max_side
  config.outputs.overlays = False
  config.outputs.panels = 0
  config.outputs.reconstructions = 0
  config.outputs.roc = False
  return evaluate_job.run(config, workdir)


def _evaluate_at_input_size(dataset, tmp_path) -> float:
  summary = _evaluate(dataset, tmp_path / "at_input", 0)
  return summary["per_category"]["images"]["pixel_auroc"]


def _reference_auroc(dataset, workdir, max_side: int) -> float:
  """AUROC over every pixel: the saved map (at the image's size) resized by Pillow to the
  mask's capped size, against the mask as read from disk (nearest)."""
  values, truth = [], []
  for i, (h, w) in enumerate(SIZES):
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # Pillow's (width, height).
    with np.load(workdir / "maps" / "images" / f"t{i}.png.npz") as f:
      saved = f["map"].astype(np.float32)
    assert saved.shape == (h, w)
    values.append(np.asarray(Image.fromarray(saved).resize(size, Image.BILINEAR)).ravel())
    mask = Image.open(dataset / "masks" / f"t{i}.png").resize(size, Image.NEAREST)
    truth.append((np.asarray(mask) > 0).ravel())
  return float(roc_auc_score(np.concatenate(truth), np.concatenate(values)))


@pytest.mark.parametrize("max_side", [1024, 50])
def test_pixel_auroc_at_the_masks_own_size(dataset, tmp_path, max_side):
  summary = _evaluate(dataset, tmp_path / "work", max_side)
  ours = summary["per_category"]["images"]["pixel_auroc"]
  expected = _reference_auroc(dataset, tmp_path / "work", max_side)
  if max_side >= max(max(s) for s in SIZES):  # Uncapped: the saved maps themselves.
    assert ours == pytest.approx(expected, abs=1e-6)
  else:  # Capped: the saved maps resized again, against the model's maps resized once.
    assert ours == pytest.approx(expected, abs=0.02)
  assert ours != pytest.approx(_evaluate_at_input_size(dataset, tmp_path), abs=1e-6)
  written = json.loads((tmp_path / "work" / "metrics.json").read_text())
  assert written["per_category"]["images"]["pixel_auroc"] == ours


def test_the_original_size_is_capped_on_the_longer_side():
  from maeday_jax.data.pipeline import original_mask_size

  assert original_mask_size(700, 1024, 1024) == (700, 1024)
  assert original_mask_size(1500, 1000, 1024) == (1024, 683)
  assert original_mask_size(3, 4000, 100) == (1, 100)  # Never a side of 0.
  accumulator = metrics.PixelMetricAccumulator()
  accumulator.add(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), np.eye(3, 4) > 0)
  assert accumulator.num_images == 1

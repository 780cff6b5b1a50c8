"""Export of the text-prompted CLIP detectors: a tiny fitted `clip_zero_shot` and a
few-shot `april_gan` (adapters and memory banks) exported as StableHLO (directly, and
by the export job from a saved artifact) and as ONNX, loaded back with
`maeday_jax.exported`, score the same images as the detector within 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from maeday_jax import defaults, detectors, exported, exporting
from maeday_jax.detectors import scoring
from maeday_jax.jobs import export as export_job

SIZE = 32


def _aux_folder(root) -> dict:
  """8 textures, every other one with a bright square and its mask."""
  rng = np.random.default_rng(0)
  for i in range(8):
    image = np.clip(rng.normal(120, 15, (40, 40, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((40, 40), np.uint8)
    if i % 2:
      image[8:20, 10:24], mask[8:20, 10:24] = 250, 255
    for folder, array in (("images", image), ("masks", mask)):
      (root / folder).mkdir(parents=True, exist_ok=True)
      Image.fromarray(array).save(root / folder / f"t{i}.png")
  return {
    "name": "folder",
    "path": str(root / "images"),
    "mask_path": str(root / "masks"),
    "data_dir": str(root / "tfds"),
    "num_workers": 2,
  }


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
  """{method: fitted detector}: clip_zero_shot, and april_gan with 2 shots' banks."""
  zero_shot = detectors.create(defaults.fit_config("runlocal"), "clip_zero_shot")
  zero_shot.fit(detectors.NormalImages.from_arrays(np.zeros((0, SIZE, SIZE, 3))), None)
  config = defaults.fit_config("runlocal")
  config.detector = "april_gan"
  config.data.update(_aux_folder(tmp_path_factory.mktemp("clip_export_aux")))
  config.april_gan.update(steps=2, few_shot=True)
  april = detectors.create(config)
  shots = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  april.fit(detectors.NormalImages.from_arrays(shots, data=config.data), None)
  assert "banks" in april.state and "adapters" in april.state
  return {"clip_zero_shot": zero_shot, "april_gan": april}


def _assert_scores_like(net, detector, seed):
  for count in (1, 3):
    images = np.random.default_rng(seed + count).normal(size=(count, SIZE, SIZE, 3))
    images = images.astype(np.float32)
    maps, scores = net.score(images)
    expected_maps, expected_scores = scoring.score_images(detector, images)
    assert maps.shape == expected_maps.shape and scores.shape == expected_scores.shape
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-4)
    np.testing.assert_allclose(maps, expected_maps, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["clip_zero_shot", "april_gan"])
def test_stablehlo_export_scores_like_the_detector(fitted, tmp_path, method):
  detector = fitted[method]
  folder = exporting.export_stablehlo(detector, tmp_path / "exported", platforms=("cpu",))
  manifest = json.loads((folder / exporting.MANIFEST).read_text())
  assert manifest["method"] == method and manifest["platforms"] == ["cpu"]
  net = exported.load(folder)
  assert net.input_size == detector.read_size == SIZE
  _assert_scores_like(net, detector, 10)


def test_the_export_job_exports_a_saved_april_gan_artifact(fitted, tmp_path):
  artifact = detectors.save(fitted["april_gan"], tmp_path / "detector")
  config = defaults.evaluate_config("runlocal")
  config.job, config.format, config.platforms = "export", "stablehlo", "cpu"
  config.detector = str(artifact)
  export_job.run(config, tmp_path / "work")
  _assert_scores_like(
    exported.load(tmp_path / "work" / export_job.EXPORT_DIR), fitted["april_gan"], 20
  )


@pytest.mark.parametrize("method", ["clip_zero_shot", "april_gan"])
def test_onnx_export_scores_like_the_detector(fitted, tmp_path, method):
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  from maeday_jax import exporting_onnx

  detector = fitted[method]
  folder = exporting_onnx.export_onnx(detector, tmp_path / "exported")
  manifest = json.loads((folder / exporting.MANIFEST).read_text())
  assert manifest["format"] == "onnx" and manifest["method"] == method
  net = exported.load(folder)
  assert isinstance(net, exported.OnnxDetector)
  _assert_scores_like(net, detector, 30)

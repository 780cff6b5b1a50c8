"""StableHLO export: the exported module, run through `maeday_jax.exported` (JAX alone),
scores like the library for maeday, maeday_lora, patchcore, an ensemble and MuSc; the job
writes it from an artifact; ONNX and unknown platforms are refused with the reason."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from maeday_jax import defaults, detectors, exported, exporting
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import scoring
from maeday_jax.jobs import export as export_job


def _fitted(method: str, **fields):
  config = defaults.fit_config("runlocal")
  config.train.steps = 2
  for name, value in fields.items():
    *parents, leaf = name.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  detector = detectors.create(config, method)
  rng = np.random.default_rng(0)
  shots = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  heldout = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
  normals = detectors.NormalImages.from_arrays(shots, heldout)
  detectors.fit_with_statistics(detector, normals, jax.random.key(0))
  return detector


@pytest.mark.parametrize(
  "method, fields",
  [
    ("maeday", {}),
    ("maeday_lora", {}),
    ("patchcore", {}),
    ("ensemble", {"members": "maeday_lora,patchcore"}),
    # The tiny random DINOv2's class tokens are nearly parallel: the re-scoring would rank
    # on float noise, which two compilations need not share (tests/test_musc.py).
    ("musc", {"musc.rescore_k": ()}),
  ],
)
def test_exported_scores_equal_the_library(tmp_path, method, fields):
  detector = _fitted(method, **fields)
  folder = exporting.export_stablehlo(detector, tmp_path / "exported", platforms=("cpu", "cuda"))
  manifest = json.loads((folder / exporting.MANIFEST).read_text())
  assert manifest["platforms"] == ["cpu", "cuda"] and manifest["method"] == method
  assert manifest["transductive"] == (method == "musc")
  net = exported.load(folder)
  size = detector.input_size
  for count in (1, 5):  # The batch dimension is symbolic: any size, one module.
    images = np.random.default_rng(count).normal(size=(count, size, size, 3)).astype(np.float32)
    maps, scores = net.score(images)
    expected_maps, expected_scores = scoring.score_images(detector, images)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-4)


def test_the_job_exports_an_artifact_and_refuses_what_it_cannot(tmp_path):
  detector = _fitted("patchcore")
  artifact = detectors.save(detector, tmp_path / "detector")
  config = defaults.evaluate_config("runlocal")
  config.job, config.format, config.platforms = "export", "stablehlo", "cpu"
  config.detector = str(artifact)
  export_job.run(config, tmp_path / "work")
  net = exported.load(tmp_path / "work" / export_job.EXPORT_DIR)
  images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
  np.testing.assert_allclose(
    net.score(images)[1], scoring.score_images(detector, images)[1], rtol=1e-5
  )
  config.format = "onnx"
  with pytest.raises(ConfigError, match="ONNX export is not available"):
    export_job.validate(config)
  config.format, config.platforms = "stablehlo", "cpu,metal"
  with pytest.raises(ConfigError, match="metal"):
    export_job.validate(config)


def test_a_folder_for_another_platform_or_a_broken_one_is_refused(tmp_path):
  detector = _fitted("maeday")
  folder = exporting.export_stablehlo(detector, tmp_path / "tpu_only", platforms=("tpu",))
  with pytest.raises(exported.ExportError, match="exported for tpu"):
    exported.load(folder)
  (folder / exporting.STATE_FILE).unlink()
  with pytest.raises(exported.ExportError, match="not a readable exported detector"):
    exported.load(folder)

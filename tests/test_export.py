"""Export: the StableHLO module, run through `maeday_jax.exported` (JAX alone), scores like
the library for maeday, maeday_lora, patchcore, an ensemble and MuSc; the ONNX file, run in
onnxruntime, for maeday, maeday_lora, patchcore and an ensemble (MuSc is refused, naming
the primitive); MAEDAY's ONNX masks are the library's; the job writes it from an artifact;
unknown platforms and a missing extra are refused with the reason."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maeday_jax import defaults, detectors, exported, exporting, exporting_onnx, zero_shot
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import scoring
from maeday_jax.jobs import export as export_job
from maeday_jax.models import masking

ENSEMBLE = {"members": "maeday_lora,patchcore"}
TILED = {"tiling.mode": "tiles+global", "tiling.image_size": 48}
_FITTED: dict = {}


def _fitted_once(method: str, **fields):
  """One fitted detector per method and settings for the whole module (tests only read
  them): the ONNX tests reuse the StableHLO tests' detectors."""
  key = (method, tuple(sorted(fields.items())))
  if key not in _FITTED:
    _FITTED[key] = _fitted(method, **fields)
  return _FITTED[key]


def _fitted(method: str, **fields):
  config = defaults.fit_config("runlocal")
  config.train.steps = 2
  # Exports are compared with the library to float32 rounding; in bfloat16 (`auto` on
  # CPUs with bfloat16 instructions) two compilations of one model round differently.
  config.model.dtype = "float32"
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
    ("ensemble", ENSEMBLE),
    # Tiled: 4 tiles of 32 px of 48 px images, and the whole image (tiles + global).
    ("maeday_lora", TILED),
    # The tiny random DINOv2's class tokens are nearly parallel: the re-scoring would rank
    # on float noise, which two compilations need not share (tests/test_musc.py).
    ("musc", {"musc.rescore_k": ()}),
  ],
)
def test_exported_scores_equal_the_library(tmp_path, method, fields):
  detector = _fitted_once(method, **fields)
  folder = exporting.export_stablehlo(detector, tmp_path / "exported", platforms=("cpu", "cuda"))
  manifest = json.loads((folder / exporting.MANIFEST).read_text())
  assert manifest["platforms"] == ["cpu", "cuda"] and manifest["method"] == method
  assert manifest["transductive"] == (method == "musc")
  net = exported.load(folder)
  size = detector.read_size
  assert net.input_size == size
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
  config.platforms = "cpu,metal"
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


# ---------------------------------------------------------------------------------- ONNX


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
  """`export(method, fields)`: the ONNX folder of that fitted detector, written once."""
  pytest.importorskip("jax2onnx")
  pytest.importorskip("onnxruntime")
  from maeday_jax import exporting_onnx

  folders = {}

  def export(method, fields):
    key = (method, tuple(sorted(fields.items())))
    if key not in folders:
      parent = tmp_path_factory.mktemp(f"onnx_{method}")
      detector = _fitted_once(method, **fields)
      folders[key] = exporting_onnx.export_onnx(detector, parent / "exported")
    return folders[key]

  return export


def _assert_close(actual, expected, tolerance=1e-4):
  # Within 1e-4 of the values' scale (the export's own check): an ensemble's standardised
  # maps cross zero, where a relative bound per pixel would judge float32 rounding.
  scale = max(1.0, float(np.max(np.abs(expected))))
  assert actual.shape == expected.shape
  assert np.max(np.abs(actual - expected)) <= tolerance * scale


@pytest.mark.parametrize(
  "method, fields",
  [
    ("maeday", {}),
    ("maeday_lora", {}),
    ("patchcore", {}),
    ("ensemble", ENSEMBLE),
    ("maeday_lora", TILED),
  ],
)
def test_onnx_scores_equal_the_library(onnx_export, method, fields):
  detector = _fitted_once(method, **fields)
  folder = onnx_export(method, fields)
  manifest = json.loads((folder / exporting.MANIFEST).read_text())
  assert manifest["format"] == "onnx" and manifest["method"] == method
  assert manifest["checked"]["batches"] == [1, 3]
  # Only MAEDAY draws masks: PatchCore's graph takes the images alone.
  assert (manifest["masks_module"] is None) == (method == "patchcore")
  assert sorted(p.name for p in folder.parent.iterdir()) == ["exported"]  # Nothing partial.
  net = exported.load(folder)
  assert isinstance(net, exported.OnnxDetector)
  size = detector.read_size
  for count in (1, 3):  # The batch dimension is dynamic: one file for every batch size.
    images = np.random.default_rng(10 + count).normal(size=(count, size, size, 3))
    images = images.astype(np.float32)
    maps, scores = net.score(images)
    expected_maps, expected_scores = scoring.score_images(detector, images)
    _assert_close(scores, expected_scores)
    _assert_close(maps, expected_maps)


def test_onnx_maeday_takes_the_library_masks_as_inputs(onnx_export):
  detector = _fitted_once("maeday")
  net = exported.load(onnx_export("maeday", {}))
  model, params, s = detector.model, detector.state["mae"], detector.settings
  size = detector.input_size
  images = np.random.default_rng(7).normal(size=(3, size, size, 3)).astype(np.float32)
  images[2] = images[0]  # A byte-identical copy: the same masks, the same map.
  feeds = net.inputs(images)
  # The random inputs are the library's masks of these images: visible and restore indices.
  keys = zero_shot.image_keys(detector.scoring_key(), exported.image_ids(images))
  noise = zero_shot.image_noise(keys, s.num_masks, model.num_patches, s.mask_ratio, s.masking)
  drawn = masking.from_noise(np.swapaxes(noise, 0, 1), s.mask_ratio)  # (N, B, L)
  np.testing.assert_array_equal(feeds["random_0"][..., 0], drawn.ids_keep)
  np.testing.assert_array_equal(feeds["random_1"][..., 0], drawn.ids_restore)
  np.testing.assert_array_equal(feeds["random_0"][:, 0], feeds["random_0"][:, 2])
  # Masks of one's own (other noise) give the library's maps for those masks.
  other = jax.random.uniform(jax.random.key(5), noise.shape)
  own = masking.from_noise(np.swapaxes(other, 0, 1), s.mask_ratio)
  feeds["random_0"] = np.asarray(own.ids_keep)[..., None]
  feeds["random_1"] = np.asarray(own.ids_restore)[..., None]
  maps, _ = net.session.run(["maps", "scores"], feeds)
  expected = zero_shot.anomaly_maps_from_noise(model, params, images, other, s.mask_ratio)
  _assert_close(maps, np.asarray(expected))


def test_onnx_refusals_name_the_cause_and_write_nothing(tmp_path, monkeypatch):
  pytest.importorskip("jax2onnx")
  detector = _fitted_once("musc", **{"musc.rescore_k": ()})
  artifact = detectors.save(detector, tmp_path / "detector")
  config = defaults.evaluate_config("runlocal")
  config.job, config.format, config.platforms = "export", "onnx", "cpu"
  config.detector = str(artifact)
  # MuSc sorts along the batch (its group), which jax2onnx converts for static lengths only.
  with pytest.raises(ConfigError, match=r"--config.format=onnx: musc .*primitive sort"):
    export_job.run(config, tmp_path / "work")
  assert not (tmp_path / "work" / export_job.EXPORT_DIR).exists()
  assert not list((tmp_path / "work").glob(".*partial"))
  monkeypatch.setitem(sys.modules, "jax2onnx", None)  # As if the extra were not installed.
  with pytest.raises(ConfigError, match=r'jax2onnx .*pip install -e "\.\[export\]"'):
    export_job.validate(config)


def test_a_bfloat16_detector_is_exported_to_onnx_in_float32(tmp_path):
  pytest.importorskip("jax2onnx")
  detector = _fitted("maeday", **{"model.dtype": "bfloat16"})
  with pytest.raises(exporting_onnx.OnnxExportError, match="half precision"):
    exporting_onnx.export_onnx(detector, tmp_path / "direct")
  assert not (tmp_path / "direct").exists()
  artifact = detectors.save(detector, tmp_path / "detector")
  config = defaults.evaluate_config("runlocal")
  config.job, config.format, config.platforms = "export", "onnx", "cpu"
  config.detector = str(artifact)
  export_job.run(config, tmp_path / "work")
  # It loaded in onnxruntime (which refuses bfloat16 convolutions) and scores as float32:
  as_float32 = detectors.load(artifact, model_dtype="float32")
  assert as_float32.model.dtype == jnp.float32 and detector.model.dtype == jnp.bfloat16
  size = detector.read_size
  images = np.random.default_rng(3).normal(size=(2, size, size, 3)).astype(np.float32)
  maps, scores = exported.load(tmp_path / "work" / export_job.EXPORT_DIR).score(images)
  expected_maps, expected_scores = scoring.score_images(as_float32, images)
  _assert_close(scores, expected_scores)
  _assert_close(maps, expected_maps)

"""The detector interface: registry, artifacts, and every job taking any detector.

Each method is fitted once on a small folder (tiny random-weight models), its artifact is
copied elsewhere and the fit's work directory deleted; the evaluate and bulk jobs must
then give the same per-image scores from the copy. A test-only detector, registered at
run time, goes through fit, save, load, score and the bulk job without touching any other
module, and its scores are checked against NumPy.
"""

from __future__ import annotations

import csv
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from maeday_jax import data, defaults, detectors
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import artifact, registry, scoring
from maeday_jax.detectors.base import Detector
from maeday_jax.jobs import evaluate as evaluate_job
from maeday_jax.jobs import fit as fit_job
from maeday_jax.jobs import score as score_job
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from configs import score as score_config  # noqa: E402

SIZE = 40  # Images on disk; every detector resizes to its own input.


def _write(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
  """normal/ (10 smooth textures), images/ (3 normal, 3 with a bright square) + masks/."""
  root = tmp_path_factory.mktemp("detector_data")
  rng = np.random.default_rng(0)
  base = np.linspace(60, 180, SIZE, dtype=np.float32)[None, :, None]

  def texture():
    noise = rng.normal(0, 12, size=(SIZE, SIZE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)

  for i in range(10):
    _write(root / "normal" / f"n{i}.png", texture())
  for i in range(6):
    image = texture()
    mask = np.zeros((SIZE, SIZE), np.uint8)
    if i >= 3:
      image[10:22, 14:26] = 250
      mask[10:22, 14:26] = 255
    _write(root / "images" / f"t{i}.png", image)
    _write(root / "masks" / f"t{i}.png", mask)
  return root


def _data(root: pathlib.Path, tfds_dir: pathlib.Path) -> dict:
  return {
    "name": "folder",
    "path": str(root / "images"),
    "normal_path": str(root / "normal"),
    "mask_path": str(root / "masks"),
    "data_dir": str(tfds_dir),
    "num_workers": 2,
  }


def _fit_config(root, tfds_dir, detector: str, **fields) -> ml_collections.ConfigDict:
  config = defaults.fit_config("runlocal")
  config.detector = detector
  config.data.update(_data(root, tfds_dir))
  config.shots = 2
  config.heldout_normals = 4
  for key, value in fields.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _evaluate_config(root, tfds_dir, spec: str) -> ml_collections.ConfigDict:
  config = defaults.evaluate_config("runlocal")
  config.detector = spec
  config.data.update(_data(root, tfds_dir))
  config.outputs.overlays = False
  config.outputs.panels = 0
  config.outputs.reconstructions = 0
  config.outputs.roc = False
  return config


def _score_config(path, spec: str) -> ml_collections.ConfigDict:
  config = score_config.get_config("runlocal")
  config.detector = spec
  config.data.path = str(path)
  config.data.num_workers = 2
  config.commit_every = 1
  config.compilation_cache_dir = ""
  return config


def _scores(csv_path: pathlib.Path) -> dict[str, float]:
  with open(csv_path, newline="") as f:
    return {pathlib.PurePath(r["file"]).name: float(r["score"]) for r in csv.DictReader(f)}


def _fit_elsewhere(tmp_path, config) -> pathlib.Path:
  """Fits, copies the artifact to a new folder, deletes the fit's work directory."""
  workdir = tmp_path / "fit"
  fit_job.run(config, workdir)
  copy = tmp_path / "elsewhere" / "detector"
  shutil.copytree(workdir / fit_job.ARTIFACT_DIR, copy)
  shutil.rmtree(workdir)
  return copy


# --------------------------------------------------------------------------- registry


def test_unknown_detector_is_one_error_line_before_any_work(tmp_path):
  """`configs/fit.py:runlocal --config.detector=typo` alone: one error line, exit 2, no
  work directory created (nothing read, nothing loaded)."""
  for config in ("fit", "evaluate", "score"):
    workdir = tmp_path / config
    result = subprocess.run(
      [sys.executable, "-m", "maeday_jax.main", "--config", f"configs/{config}.py:runlocal"]
      + ["--config.detector=typo", "--workdir", str(workdir)],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --config.detector: unknown"), lines
    for name in registry.names():
      assert name in lines[0]
    assert not workdir.exists()


def test_ensemble_members_are_checked():
  config = defaults.fit_config("runlocal")
  config.detector = "ensemble"
  config.members = "maeday_lora,patchcor"
  with pytest.raises(ConfigError, match=r"--config.members: unknown detector 'patchcor'"):
    fit_job.validate(config)
  config.members = "patchcore"
  with pytest.raises(ConfigError, match="at least two members"):
    fit_job.validate(config)


def test_config_files_read_every_method_without_jax():
  """The job configs hold every registered method's sections, loaded without JAX."""
  code = (
    "import sys; sys.path.insert(0, '.');"
    "from configs import fit, evaluate, score;"
    "configs = [m.get_config('runlocal') for m in (fit, evaluate, score)];"
    "heavy = [m for m in sys.modules if m.split('.')[0] in "
    "('jax', 'flax', 'optax', 'orbax', 'tensorflow')];"
    "print(sorted(configs[0].keys())); assert not heavy, heavy"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
  )
  assert out.returncode == 0, out.stderr
  for section in ("model", "num_masks", "train", "patchcore", "ensemble", "mala", "pretrain"):
    assert f"'{section}'" in out.stdout


# ------------------------------------------------------------------------- round trips


ROUND_TRIPS = {
  "patchcore": ("patchcore", {}),
  "maeday_lora": ("maeday_lora", {}),
  "ensemble": ("ensemble", {"members": "maeday_lora,patchcore"}),
  "mala": ("mala", {}),
  "anomalydino": ("anomalydino", {}),
  # Adapters trained 2 steps on the same folder's masks (runlocal), banks from the shots.
  "april_gan": ("april_gan", {"april_gan.few_shot": True}),
  # Reconstructor trained 2 steps on the folder's normal images (codebook targets).
  "pmad": ("pmad", {}),
  # Members of different input sizes (32 and 56 px): resized on device.
  "ensemble_dino": ("ensemble", {"members": "maeday_lora,anomalydino"}),
  # Tiled (4 tiles of 32 px of 48 px images; PatchCore also the whole image): fitted on
  # tiles, scored tiled from the artifact's settings alone.
  "patchcore_tiled": ("patchcore", {"tiling.mode": "tiles+global", "tiling.image_size": 48}),
  "ensemble_tiled": (
    "ensemble",
    {"members": "maeday_lora,patchcore", "tiling.mode": "tiles", "tiling.image_size": 48},
  ),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_fitted_artifact_scores_alike_in_evaluate_and_bulk(dataset, tmp_path, case):
  """fit -> copy the artifact, delete the fit -> evaluate and bulk scoring of the same
  images from the copy give the same per-image scores (1e-4 relative), all finite and
  not all equal; the manifest records what the fit saw."""
  tfds_dir = tmp_path / "tfds"
  method, fields = ROUND_TRIPS[case]
  config = _fit_config(dataset, tfds_dir, method, **fields)
  copy = _fit_elsewhere(tmp_path, config)

  manifest = json.loads((copy / artifact.MANIFEST).read_text())
  assert manifest["method"] == method and manifest["format_version"] == artifact.FORMAT_VERSION
  assert manifest["normalization"] == "imagenet"
  assert manifest["settings"]["tiling"]["mode"] == fields.get("tiling.mode", "none")
  assert manifest["versions"]["jax"] == jax.__version__
  if method not in ("mala", "pmad"):  # These train on every normal image, not on shots.
    assert len(manifest["fit"]["shots"]) == 2 and len(manifest["fit"]["heldout"]) == 4
    assert not set(manifest["fit"]["shots"]) & set(manifest["fit"]["heldout"])

  evaluate_job.run(_evaluate_config(dataset, tfds_dir, str(copy)), tmp_path / "eval")
  score_job.run(_score_config(dataset / "images", str(copy)), tmp_path / "bulk")
  evaluated = _scores(tmp_path / "eval" / "scores.csv")
  bulk = _scores(tmp_path / "bulk" / "scores.csv")
  assert sorted(evaluated) == sorted(bulk) == [f"t{i}.png" for i in range(6)]
  values = np.array([bulk[name] for name in sorted(bulk)])
  assert np.isfinite(values).all() and np.ptp(values) > 0
  for name, value in evaluated.items():
    assert value == pytest.approx(bulk[name], rel=1e-4, abs=1e-6), name


def test_artifact_load_equals_the_fitted_detector(dataset, tmp_path):
  """Loading gives the detector that was saved: the same maps, exactly, for PatchCore
  and for an ensemble whose standardisation comes from the held-out normals."""
  tfds_dir = tmp_path / "tfds"
  config = _fit_config(dataset, tfds_dir, "patchcore_x2")
  fitted = detectors.create(config)
  normals, _ = detectors.normal_images(config, data.resolve_categories(config.data)[0])
  detectors.fit_with_statistics(fitted, normals, jax.random.key(0))
  assert all(m.normal_statistics for m in fitted.members)
  saved = detectors.save(fitted, tmp_path / "det")
  loaded = detectors.load(saved)
  _, heldout = normals.images(fitted.input_size)
  from maeday_jax.detectors import scoring

  maps_a, scores_a = scoring.score_images(fitted, heldout)
  maps_b, scores_b = scoring.score_images(loaded, heldout)
  np.testing.assert_array_equal(maps_a, maps_b)
  np.testing.assert_array_equal(scores_a, scores_b)
  # Standardised members: on their own held-out normals the sum has mean ~0.
  assert abs(float(np.mean(scores_a))) < 1.0


# --------------------------------------------------------------------- bad artifacts


@pytest.fixture(scope="module")
def patchcore_artifact(dataset, tmp_path_factory) -> pathlib.Path:
  tmp = tmp_path_factory.mktemp("patchcore_artifact")
  config = _fit_config(dataset, tmp / "tfds", "patchcore")
  fit_job.run(config, tmp / "fit")
  return tmp / "fit" / fit_job.ARTIFACT_DIR


def test_a_percentile_threshold_reuses_the_held_out_scores(dataset, tmp_path, monkeypatch):
  calls = []
  score_images = scoring.score_images

  def counted(detector, images, *args, **kwargs):
    calls.append(len(images))
    return score_images(detector, images, *args, **kwargs)

  monkeypatch.setattr(scoring, "score_images", counted)
  config = _fit_config(
    dataset, tmp_path / "tfds", "patchcore", **{"threshold.method": "percentile"}
  )
  summary = fit_job.run(config, tmp_path / "fit")
  assert calls == [4]  # The held-out normals, scored once for statistics and threshold.
  monkeypatch.setattr(scoring, "score_images", score_images)
  # The same held-out images, scored again by the saved artifact: their 99th percentile.
  fitted = detectors.load(tmp_path / "fit" / fit_job.ARTIFACT_DIR)
  category = data.resolve_categories(config.data)[0]
  normals, record = detectors.fitting.normal_images(config, category)
  assert record["heldout"] == summary["heldout"]
  _, again = scoring.score_images(fitted, normals.images(fitted.input_size)[1])
  expected = np.percentile(again.astype(np.float64), 99.0)
  np.testing.assert_allclose(summary["threshold"]["value"], expected, rtol=1e-5)


def _damaged(source: pathlib.Path, target: pathlib.Path, change) -> pathlib.Path:
  shutil.copytree(source, target)
  change(target)
  return target


def _edit_manifest(**fields):
  def change(folder):
    path = folder / artifact.MANIFEST
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))

  return change


def _truncate_state(folder):
  largest = max(
    (p for p in (folder / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


@pytest.mark.parametrize(
  ("change", "message"),
  [
    (_edit_manifest(method="nearest_mean"), "method 'nearest_mean', which this maeday_jax"),
    (_edit_manifest(format_version=99), "artifact format 99, newer than"),
    (_truncate_state, "truncated, edited or copied incompletely"),
    (lambda f: (f / artifact.MANIFEST).unlink(), "not a fitted detector folder"),
    (lambda f: (f / artifact.MANIFEST).write_text("{not json"), "unreadable"),
  ],
)
def test_unusable_artifacts_are_refused_with_the_reason(
  patchcore_artifact, tmp_path, change, message
):
  damaged = _damaged(patchcore_artifact, tmp_path / "detector", change)
  with pytest.raises(detectors.ArtifactError, match=message):
    detectors.load(damaged)


def test_a_damaged_artifact_is_one_error_line_in_the_jobs(patchcore_artifact, tmp_path):
  damaged = _damaged(patchcore_artifact, tmp_path / "detector", _truncate_state)
  result = subprocess.run(
    [sys.executable, "-m", "maeday_jax.main", "--config", "configs/score.py:runlocal"]
    + [f"--config.detector={damaged}", f"--config.data.path={tmp_path}"]
    + ["--workdir", str(tmp_path / "work")],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in result.stderr


def test_a_method_that_learns_must_be_fitted_first(dataset, tmp_path):
  config = _evaluate_config(dataset, tmp_path / "tfds", "patchcore")
  with pytest.raises(ConfigError, match="must be fitted first"):
    evaluate_job.run(config, tmp_path / "eval")


# -------------------------------------------------------------- a method of one's own


class MeanImageDistance(Detector):
  """Test-only: the map is the channel-summed squared difference to the mean shot."""

  method = "mean_image_distance"
  needs_shots = True
  SECTIONS = {"mean_image": lambda: ml_collections.ConfigDict({"size": 24})}

  @property
  def input_size(self) -> int:
    return int(self.settings.mean_image.size)

  def fit(self, normals, key) -> None:
    shots, _ = normals.images(self.input_size)
    self.state = {"mean": jnp.asarray(shots.mean(axis=0))}

  def score_function(self, mesh, local_batch):
    def score(state, images, ids, key):
      maps = jnp.sum((images - state["mean"]) ** 2, axis=-1)
      return maps, jnp.max(maps, axis=(1, 2))

    return score

  def record(self) -> dict:
    return {}

  def restore(self, record, state) -> None:
    self.state = state


@pytest.fixture
def own_method():
  registry.register(MeanImageDistance.method, MeanImageDistance)
  yield MeanImageDistance.method
  registry.unregister(MeanImageDistance.method)


def test_a_method_of_ones_own_runs_through_every_job(own_method, dataset, tmp_path):
  """Registered at run time (no other module touched): fit, save, load, the bulk job;
  the scores equal a NumPy computation from the images on disk."""
  tfds_dir = tmp_path / "tfds"
  config = _fit_config(dataset, tfds_dir, own_method)
  assert config.mean_image.size == 24  # Its section reached the job config.
  copy = _fit_elsewhere(tmp_path, config)
  manifest = json.loads((copy / artifact.MANIFEST).read_text())
  score_job.run(_score_config(dataset / "images", str(copy)), tmp_path / "bulk")
  bulk = _scores(tmp_path / "bulk" / "scores.csv")

  def model_input(path):  # Pillow bilinear to 24 px, then ImageNet mean/std, by hand.
    image = Image.open(path).convert("RGB").resize((24, 24), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.float64) / 255.0
    return (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]

  shots = [dataset / "normal" / name for name in manifest["fit"]["shots"]]
  mean = np.mean([model_input(p) for p in shots], axis=0)
  for name, value in bulk.items():
    expected = np.max(np.sum((model_input(dataset / "images" / name) - mean) ** 2, axis=-1))
    assert value == pytest.approx(expected, rel=1e-4), name


def test_public_weights_are_referenced_by_name_and_checked_by_hash(
  file_server, fixtures_dir, monkeypatch, tmp_path
):
  """A detector on a public checkpoint stores no weights: the artifact names them with
  their SHA-256; elsewhere (another cache) they are downloaded again and checked, and the
  scores are the same; another file under the name is refused."""
  from maeday_jax import checkpoints
  from maeday_jax.detectors import scoring

  payload = (fixtures_dir / "mae_ref_a.pth").read_bytes()
  server = file_server({"mae_ref_a.pth": payload})
  remote = checkpoints.RemoteFile(f"{server.url}/mae_ref_a.pth")
  monkeypatch.setitem(checkpoints.KNOWN_CHECKPOINTS, "mae_public_test", remote)
  monkeypatch.setenv("MAEDAY_CACHE_DIR", str(tmp_path / "fitting_machine"))
  config = defaults.fit_config("runlocal")
  config.model.checkpoint = "mae_public_test"
  fitted = detectors.create(config, "maeday")
  fitted.fit(detectors.NormalImages.from_arrays(np.zeros((0, 32, 32, 3))), None)
  folder = detectors.save(fitted, tmp_path / "detector")
  manifest = json.loads((folder / artifact.MANIFEST).read_text())
  digest = __import__("hashlib").sha256(payload).hexdigest()
  assert manifest["record"]["weights"] == {
    "kind": "mae",
    "name": "mae_public_test",
    "sha256": digest,
  }
  assert manifest["state_files"] == {} and not (folder / artifact.STATE_DIR).exists()

  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  expected = scoring.score_images(fitted, images)
  requests = len(server.requests)
  monkeypatch.setenv("MAEDAY_CACHE_DIR", str(tmp_path / "scoring_machine"))
  loaded = detectors.load(folder)
  assert len(server.requests) == requests + 1  # Downloaded again into this machine's cache.
  for ours, theirs in zip(scoring.score_images(loaded, images), expected, strict=True):
    np.testing.assert_array_equal(ours, theirs)

  cached = tmp_path / "scoring_machine" / "mae_ref_a.pth"
  cached.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
  with pytest.raises(detectors.ArtifactError, match="another file under the same name"):
    detectors.load(folder)

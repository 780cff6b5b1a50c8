"""Bulk scoring with a transductive detector: groups, padding, kill and resume, errors.

A test-only transductive detector, registered at run time, maps each pixel to its squared
distance from the mean image of the other valid images of its group; its bulk scores are checked
against NumPy over the same groups (consecutive images of the sorted listing, 8 per group
on the 8 simulated devices), computed from the images on disk.
"""

from __future__ import annotations

import csv
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from maeday_jax import evaluation, parallel
from maeday_jax.bulk import engine
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import registry, scoring
from maeday_jax.detectors.base import Detector
from maeday_jax.jobs import score as score_job
from maeday_jax.jobs.common import WorkdirError
from tests import data_makers
from tests.bulk_kill import kill_before_record
from tests.processes import run_processes

SIZE = 24  # The test detectors' input size.
GROUP = 6  # Rounded up to 8, the simulated device count: the groups hold 8 positions.
NAMES = [f"g{i:02d}.png" for i in range(20)]
BAD = "g10.png"  # Truncated: an invalid row of the second group.
# Positions [0, 8), [8, 16) and [16, 20) plus 4 rows of padding.
GROUPS = [NAMES[start : start + 8] for start in range(0, len(NAMES), 8)]
RUN = {"data.num_workers": 2, "commit_every": 1, "compilation_cache_dir": ""}


def others_mean_distance(images, valid):
  """Each image's channel-summed squared distance to the mean of the other valid images
  (so a copy of an image in its group, or a group of another size, changes it)."""
  weight = valid.astype(images.dtype)[:, None, None, None]
  others = (jnp.sum(images * weight, axis=0) - images * weight) / jnp.maximum(
    jnp.sum(weight) - weight, 1.0
  )
  maps = jnp.sum((images - others) ** 2, axis=-1)
  return maps, jnp.max(maps, axis=(1, 2))


class GroupMeanDistance(Detector):
  """Test-only, transductive: an image's map is its squared distance to the mean image of
  the others of the group it is scored with; the score its maximum."""

  method = "group_mean_distance"
  transductive = True

  @property
  def input_size(self) -> int:
    return SIZE

  def fit(self, normals, key) -> None:
    self.state = {}

  def score_function(self, mesh, local_batch):
    def score(state, images, ids, key, valid):
      return others_mean_distance(images, valid)

    return score

  def record(self) -> dict:
    return {}

  def restore(self, record, state) -> None:
    self.state = state


class PixelEnergy(GroupMeanDistance):
  """Test-only, not transductive: the channel-summed squared pixels of the image alone."""

  method = "pixel_energy"
  transductive = False

  def score_function(self, mesh, local_batch):
    def score(state, images, ids, key):
      maps = jnp.sum(images**2, axis=-1)
      return maps, jnp.max(maps, axis=(1, 2))

    return score


@pytest.fixture(scope="module", autouse=True)
def methods():
  for cls in (GroupMeanDistance, PixelEnergy):
    registry.register(cls.method, cls)
  yield
  for cls in (GroupMeanDistance, PixelEnergy):
    registry.unregister(cls.method)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("groups") / "images"
  for i, name in enumerate(NAMES):
    if name == BAD:
      data_makers.write_truncated(folder / name)
    else:  # Different sizes: the resize is part of what NumPy reproduces.
      data_makers.write_image(folder / name, "rgb", (30 + i % 3, 40))
  return folder


def _config(job_config, path, **fields):
  fields = {"detector": GroupMeanDistance.method, "group_size": GROUP, **RUN, **fields}
  return job_config("score", "runlocal", data={"path": path}, **fields)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory, job_config):
  """An uninterrupted run: its work directory and summary."""
  workdir = tmp_path_factory.mktemp("groups_reference") / "work"
  summary = score_job.run(_config(job_config, images), workdir)
  return workdir, summary


def _rows(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "scores.csv", newline="") as f:
    return list(csv.DictReader(f))


def model_input(path) -> np.ndarray:
  """Pillow bilinear resize to SIZE, then ImageNet mean/std, by hand."""
  image = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
  pixels = np.asarray(image, np.float64) / 255.0
  return (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]


def numpy_scores(folder, groups, padding: int = 0) -> dict[str, float]:
  """The detector's scores over `groups` of names (BAD left out), in NumPy; `padding`
  zero images counted in the last group's mean (what the job must not do)."""
  expected = {}
  for i, group in enumerate(groups):
    inputs = {name: model_input(folder / name) for name in group if name != BAD}
    extra = padding if i == len(groups) - 1 else 0
    total = np.sum(list(inputs.values()), axis=0)
    for name, pixels in inputs.items():
      others = (total - pixels) / (len(inputs) + extra - 1)
      expected[name] = float(np.max(np.sum((pixels - others) ** 2, axis=-1)))
  return expected


def _others_maps(images: np.ndarray) -> np.ndarray:
  """The maps of `images` scored as one group, in NumPy."""
  images = images.astype(np.float64)
  others = (images.sum(axis=0) - images) / (len(images) - 1)
  return np.sum((images - others) ** 2, axis=-1)


def test_group_scores_equal_numpy_over_the_same_groups(images, reference):
  workdir, summary = reference
  rows = _rows(workdir)
  good = [name for name in NAMES if name != BAD]
  assert [r["file"] for r in rows] == good and summary["images"] == len(good)
  assert [s["file"] for s in summary["skipped"]] == [BAD]
  expected = numpy_scores(images, GROUPS)
  for row in rows:
    assert float(row["score"]) == pytest.approx(expected[row["file"]], rel=1e-4), row["file"]
  # The last group's 4 padding rows, were they in its mean, would change its scores.
  padded = numpy_scores(images, GROUPS, padding=4)
  last = {r["file"]: float(r["score"]) for r in rows if r["file"] in GROUPS[-1]}
  assert all(value != pytest.approx(padded[name], rel=1e-2) for name, value in last.items())
  # One global batch of 8 per group, each group its own part.
  record = json.loads((workdir / "shards/process_0/progress.json").read_text())
  assert record["group_size"] == GROUP and record["batch_size"] == 8
  assert record["parts"] == len(GROUPS) and record["done"]


def test_padding_rows_do_not_change_scores():
  """The scoring functions: rows marked invalid (here: large noise) leave the others'
  maps and scores as they are, in `score_local`, `score_arrays` and evaluation's batch."""
  detector = registry.create(GroupMeanDistance.method, ml_collections.ConfigDict())
  mesh = parallel.data_mesh()
  step = scoring.compile_step(detector, mesh, 16)
  assert scoring.is_transductive(step)
  replicated, key = parallel.replicate(detector.state, mesh), detector.scoring_key()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(10, SIZE, SIZE, 3)).astype(np.float32)
  noisy = np.concatenate([images, 50 * rng.normal(size=(6, SIZE, SIZE, 3))]).astype(np.float32)
  valid = np.arange(16) < 10
  expected = _others_maps(images)

  maps, scores = scoring.score_local(step, replicated, noisy, key, mesh, valid=valid)
  np.testing.assert_allclose(maps[:10], expected, rtol=1e-4)
  np.testing.assert_allclose(scores[:10], expected.max(axis=(1, 2)), rtol=1e-4)
  arrays_maps, arrays_scores = scoring.score_arrays(step, replicated, images, key, mesh)
  assert arrays_maps.shape == (10, SIZE, SIZE)
  np.testing.assert_allclose(arrays_maps, maps[:10], rtol=1e-5)
  np.testing.assert_allclose(arrays_scores, scores[:10], rtol=1e-5)
  batch = evaluation.Scoring.for_detector(detector, batch_size=16, num_workers=1)
  _, batch_scores = evaluation._score_batch(batch, noisy, valid)
  np.testing.assert_allclose(batch_scores[:10], scores[:10], rtol=1e-5)
  # Without `valid` every row is an image of the group: the noise then counts.
  _, all_rows = scoring.score_local(step, replicated, noisy, key, mesh)
  assert not np.allclose(all_rows[:10], scores[:10], rtol=1e-2)


def test_a_killed_run_resumes_to_the_same_groups_and_rows(
  images, reference, tmp_path, monkeypatch, job_config
):
  """Killed after the second group's part was written but before its record: the rerun
  deletes that part, scores the same groups again and ends with the same rows."""
  config, workdir = _config(job_config, images), tmp_path / "work"
  kill_before_record(monkeypatch, 2, lambda: score_job.run(config, workdir))
  shard = workdir / "shards/process_0"
  record = json.loads((shard / "progress.json").read_text())
  assert record["parts"] == 1 and record["next_batch"] == 1 and not record["done"]
  assert (shard / "part_1.csv").is_file()  # Written, not counted.
  assert not (workdir / "scores.csv").exists()

  summary = score_job.run(config, workdir)
  assert _rows(workdir) == _rows(reference[0])  # Identical scores, once each, in order.
  assert summary["images"] == reference[1]["images"]
  assert summary["skipped"] == reference[1]["skipped"]


def test_group_size_is_required_and_a_run_keeps_its_own(images, reference, tmp_path, job_config):
  for value, message in ((0, "this detector is transductive"), (-1, "must be >= 0")):
    workdir = tmp_path / f"group_{value}"
    config = _config(job_config, images, group_size=value)
    with pytest.raises(ConfigError, match=rf"^--config\.group_size: {message}"):
      score_job.run(config, workdir)
    assert not workdir.exists()  # Refused before any work.

  workdir = tmp_path / "copy"
  shutil.copytree(reference[0], workdir)
  # Another group size on the command line: the work directory holds another run.
  with pytest.raises(WorkdirError, match="group_size"):
    score_job.run(_config(job_config, images, group_size=GROUP + 1), workdir)
  # A record of other groups (as a resume on other devices would find): refused.
  record = workdir / "shards/process_0/progress.json"
  record.write_text(record.read_text().replace(f'"group_size": {GROUP}', '"group_size": 3'))
  with pytest.raises(ConfigError, match=r"groups of --config\.group_size=3, this run asks for 6"):
    score_job.run(_config(job_config, images), workdir)
  with pytest.raises(ValueError, match="groups of 6 are scored in batches of 8"):
    engine.score_listing(None, workdir, make_scoring=None, batch_size=16, group_size=GROUP)


def test_group_size_is_ignored_for_other_detectors(images, tmp_path, job_config, caplog):
  caplog.set_level(logging.INFO, logger="maeday_jax")
  config = _config(job_config, images, detector=PixelEnergy.method, batch_size=16)
  score_job.run(config, tmp_path / "work")
  assert "--config.group_size=6 is ignored" in caplog.text
  record = json.loads((tmp_path / "work/shards/process_0/progress.json").read_text())
  assert record["group_size"] == 0 and record["batch_size"] == 16 and record["parts"] == 2
  rows = _rows(tmp_path / "work")
  for row in rows[::5]:  # Each image on its own.
    pixels = model_input(images / row["file"])
    expected = float(np.max(np.sum(pixels**2, axis=-1)))
    assert float(row["score"]) == pytest.approx(expected, rel=1e-4)


def test_device_count_rounding():
  assert engine.group_batch_size(6, 8) == 8 and engine.group_batch_size(8, 8) == 8
  assert engine.group_batch_size(9, 8) == 16 and engine.group_batch_size(5, 1) == 5
  assert jax.device_count() == 8  # What GROUPS assumes.


# One process of a two-process run with 4 simulated CPU devices each: the bulk job in
# groups, then the same 10 images through `score_images` on both processes.
TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax

port, pid, images, workdir = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
import numpy as np
from maeday_jax.detectors import registry, scoring
from maeday_jax.jobs import score
from tests.conftest import make_job_config
from tests.test_bulk_groups import GROUP, RUN, SIZE, GroupMeanDistance

registry.register(GroupMeanDistance.method, GroupMeanDistance)
fields = {"detector": GroupMeanDistance.method, "group_size": GROUP, **RUN}
score.run(make_job_config("score", "runlocal", data={"path": images}, **fields), workdir)
detector = registry.create(GroupMeanDistance.method, make_job_config("score", "runlocal"))
images = np.random.default_rng(0).normal(size=(10, SIZE, SIZE, 3)).astype(np.float32)
np.save(f"{workdir}/score_images_{pid}.npy", scoring.score_images(detector, images)[1])
"""


def test_two_processes_group_each_ones_consecutive_share(images, tmp_path):
  """On 2 processes a group is the global batch: 4 consecutive images of each process's
  shard (10 listed positions each). `score_images`, called alike on both with the same
  images, scores them as one group (not each with its copy on the other process)."""
  run_processes(TWO_PROCESS_WORKER, str(images), str(tmp_path))
  shards_of = (NAMES[:10], NAMES[10:])
  shard_groups = [shards_of[0][at : at + 4] + shards_of[1][at : at + 4] for at in (0, 4, 8)]
  expected = numpy_scores(images, shard_groups)
  rows = _rows(tmp_path)
  assert [r["file"] for r in rows] == sorted(expected)
  for row in rows:
    assert float(row["score"]) == pytest.approx(expected[row["file"]], rel=1e-4), row["file"]
  assert expected != pytest.approx(numpy_scores(images, GROUPS), rel=1e-3)
  values = np.random.default_rng(0).normal(size=(10, SIZE, SIZE, 3)).astype(np.float32)
  alone = _others_maps(values).max(axis=(1, 2))
  for pid in (0, 1):
    np.testing.assert_allclose(np.load(tmp_path / f"score_images_{pid}.npy"), alone, rtol=1e-4)


def test_an_ensemble_with_a_transductive_member_scores_groups():
  """An ensemble is transductive when a member is; the valid rows reach that member only,
  and the sum equals its members' scores computed apart (raw sum, no statistics)."""
  from maeday_jax.detectors import ensemble as detector_ensemble

  config = ml_collections.ConfigDict({"members": "group_mean_distance,pixel_energy"})
  config.ensemble = ml_collections.ConfigDict({"normalize": False})
  assert detector_ensemble.Ensemble.scores_groups(config)
  config.members = "pixel_energy,pixel_energy"
  assert not detector_ensemble.Ensemble.scores_groups(config)
  config.members = "group_mean_distance,pixel_energy"
  combined = registry.create("ensemble", config)
  assert combined.transductive
  for member in combined.members:
    member.fit(None, None)
  combined._combine()
  rng = np.random.default_rng(3)
  images = rng.normal(size=(5, SIZE, SIZE, 3)).astype(np.float32)
  maps, scores = scoring.score_images(combined, images)
  group_maps, group_scores = others_mean_distance(images, np.ones(5, bool))
  energy = np.sum(images**2, axis=-1)
  np.testing.assert_allclose(maps, np.asarray(group_maps) + energy, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(
    scores, np.asarray(group_scores) + energy.max(axis=(1, 2)), rtol=1e-5, atol=1e-4
  )

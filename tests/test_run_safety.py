"""Runs that never go silently wrong: settings checked first, one run per work directory,
every finished category on disk, broken models named, clean Ctrl-C, stable masks."""

import csv
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from maeday_jax import checkpoints, data, evaluation, few_shot, reports
from maeday_jax.jobs import category_run, common, run_report
from maeday_jax.jobs import few_shot as few_shot_job
from maeday_jax.jobs import zero_shot as zero_shot_job
from tests import data_makers
from tests.conftest import REPO_ROOT


def _missing_folder(tmp_path) -> dict:
  """`config.data` fields of a folder that does not exist."""
  return {"name": "folder", "path": tmp_path / "missing", "data_dir": tmp_path}


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("threshold.percentile", 150.0, r"--config.threshold.percentile: must be in \[0, 100\]"),
    ("threshold.method", "percentile", r"--config.threshold.method: 'percentile' needs normal"),
    ("eval_size", -1, "--config.eval_size: must be >= 0"),
    ("mask_batch_size", -2, "--config.mask_batch_size: must be >= 0"),
    ("batch_size", 12, r"--config.batch_size: 12 is not a multiple of the number of devices"),
    ("model.dtype", "float16", "--config.model.dtype"),
  ],
)
def test_bad_settings_fail_before_any_data_or_model_work(
  tmp_path, field, value, message, job_config
):
  # The data path does not exist: a check that came after data preparation would fail
  # with a DataError instead.
  config = job_config("zero_shot", "runlocal", data=_missing_folder(tmp_path), **{field: value})
  with pytest.raises(common.ConfigError, match=message):
    zero_shot_job.run(config, tmp_path / "work")
  assert not (tmp_path / "work").exists()


def test_more_shots_than_normal_images_fail_before_the_model_loads(tmp_path, job_config):
  fake = data_makers.make_folder(tmp_path / "raw")  # 4 normal references.
  config = job_config(
    "few_shot",
    "runlocal",
    model={"checkpoint": tmp_path / "no_such_model.pth"},  # Loading would fail.
    data=data_makers.folder_fields(fake.root, tmp_path / "tfds", masks=False),
    shots=5,
  )
  with pytest.raises(common.ConfigError, match="--config.shots: 5 shots, but .* only 4 normal"):
    few_shot_job.run(config, tmp_path / "work")


def test_a_workdir_holds_one_run(tmp_path, job_config):
  workdir = tmp_path / "work"
  config = job_config("zero_shot", "runlocal", data=_missing_folder(tmp_path))
  common.prepare_workdir(workdir, config)
  (workdir / "scores.csv").write_text("old")
  common.prepare_workdir(workdir, config)  # The same run again: allowed.
  other = job_config("zero_shot", "runlocal", data=_missing_folder(tmp_path), num_masks=8)
  with pytest.raises(common.WorkdirError, match=r"another run .*num_masks.*--overwrite"):
    common.prepare_workdir(workdir, other)
  common.clear_workdir(workdir)
  assert list(workdir.iterdir()) == []
  common.prepare_workdir(workdir, other)
  assert json.loads((workdir / "config.json").read_text())["num_masks"] == 8

  stranger = tmp_path / "photos"
  stranger.mkdir()
  (stranger / "holiday.jpg").write_bytes(b"precious")
  with pytest.raises(common.WorkdirError, match="not a maeday_jax work directory"):
    common.prepare_workdir(stranger, config)
  with pytest.raises(common.WorkdirError, match="left untouched"):
    common.clear_workdir(stranger)
  assert (stranger / "holiday.jpg").read_bytes() == b"precious"


def _outcome(category: str) -> category_run.CategoryOutcome:
  result = reports.CategoryResult(category, [f"{category}/x.png"], [0], [1.5])
  metrics = reports.category_metrics(result)
  timing = {"images": 1, "seconds": 1.0, "images_per_second": 1.0}
  return category_run.CategoryOutcome(result, metrics, None, {}, timing, [])


def test_finished_categories_are_on_disk_when_a_later_one_fails(
  fixtures_dir, tmp_path, monkeypatch, job_config
):
  fake = data_makers.make_mvtec(tmp_path / "raw", categories=("bottle", "carpet"))
  config = job_config(
    "zero_shot",
    "runlocal",
    model={"checkpoint": fixtures_dir / "mae_ref_a.pth"},
    data={
      "name": "mvtec_ad",
      "path": fake.root,
      "data_dir": tmp_path / "tfds",
      "categories": "bottle,carpet",
    },
  )

  def run_category(scoring, category, config, workdir, seed=None):
    if category == "carpet":
      raise KeyboardInterrupt  # A kill or Ctrl-C during the second category.
    return _outcome(category)

  monkeypatch.setattr(run_report, "run_category", run_category)
  with pytest.raises(KeyboardInterrupt):
    zero_shot_job.run(config, tmp_path / "work")
  with open(tmp_path / "work" / "scores.csv") as f:
    assert [r["file"] for r in csv.DictReader(f)] == ["bottle/x.png"]
  metrics = json.loads((tmp_path / "work" / "metrics.json").read_text())
  assert list(metrics["per_category"]) == ["bottle"]


def test_nan_maps_name_the_model():
  result = reports.CategoryResult("tiles", ["a.png", "b.png"], [-1, -1], [1.0, np.nan])
  with pytest.raises(checkpoints.CheckpointError, match=r"broken\.pth .*1 of 2 images .*b\.png"):
    category_run.check_finite(result, "broken.pth")
  category_run.check_finite(reports.CategoryResult("t", ["a"], [-1], [1.0]), "fine.pth")


_INTERRUPTED = """
import sys
from absl import app
from maeday_jax import main

class Job:
  @staticmethod
  def run(config, workdir):
    raise KeyboardInterrupt

main._job = lambda name: Job
sys.argv = ["main", "--config=configs/zero_shot.py:runlocal", "--workdir=" + sys.argv[1]]
app.run(main.main)
"""


def test_ctrl_c_stops_cleanly_and_says_where_results_are(tmp_path):
  out = subprocess.run(
    [sys.executable, "-c", _INTERRUPTED, str(tmp_path / "w")],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 130
  assert "Interrupted" in out.stderr and str(tmp_path / "w") in out.stderr
  assert "Traceback" not in out.stderr


def test_few_shot_resume_refuses_other_training_settings(
  tmp_path, train_config, tiny_mae, tiny_params
):
  shots = np.random.default_rng(0).integers(0, 255, (1, 32, 32, 3), dtype=np.uint8)
  config = train_config(steps=1, batch_size=8)
  few_shot.adapt(tiny_mae, tiny_params, shots, jax.random.key(0), config, workdir=tmp_path)
  config.steps = 2  # Training longer resumes the same run ...
  config.lora.rank = 8  # ... but another rank and learning rate are another run.
  config.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"train\.learning_rate: was None, now 0\.5.*lora\.rank"):
    few_shot.adapt(tiny_mae, tiny_params, shots, jax.random.key(0), config, workdir=tmp_path)


def test_an_images_score_depends_on_the_image_alone(tmp_path, data_config, tiny_mae, tiny_params):
  """A byte-identical copy scores the same; removing another image changes nothing."""
  folder = tmp_path / "images"
  for name in ("a.png", "c.png", "d.png"):
    data_makers.write_image(folder / name)
  shutil.copy(folder / "a.png", folder / "b_copy.png")
  scoring = evaluation.Scoring.create(tiny_mae, tiny_params, num_masks=2, batch_size=8)

  def scores(data_dir):
    config = data_config(name="folder", path=folder, data_dir=data_dir, num_workers=1)
    split = data.load_split(config, data.resolve_categories(config)[0], "test")
    result = evaluation.score_split(scoring, split, progress=False).result
    return dict(zip(result.file_names, result.scores, strict=True))

  before = scores(tmp_path / "tfds1")
  assert before["a.png"] == before["b_copy.png"]
  (folder / "c.png").unlink()
  after = scores(tmp_path / "tfds2")
  assert after["a.png"] == before["a.png"] and after["d.png"] == before["d.png"]


def test_a_run_recorded_before_a_setting_existed_is_the_same_run(tmp_path, job_config):
  """A config.json written by an older maeday_jax lacks the newer fields: rerunning the
  same command there is the same run, not another one; a changed value is still refused."""
  config = job_config("zero_shot", "runlocal")
  workdir = tmp_path / "work"
  common.prepare_workdir(workdir, config)
  recorded = json.loads((workdir / "config.json").read_text())
  del recorded["data"]["max_image_pixels"]
  (workdir / "config.json").write_text(json.dumps(recorded))
  common.prepare_workdir(workdir, config)
  config.num_masks = 8
  with pytest.raises(common.WorkdirError, match="differs in num_masks"):
    common.prepare_workdir(workdir, config)

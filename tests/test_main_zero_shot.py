"""The zero-shot job end to end: a folder of images in, every promised output out."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from maeday_jax.jobs import zero_shot as zero_shot_job
from tests import data_makers
from tests.conftest import FIXTURE_MAE, REPO_ROOT
from tests.processes import run_processes

# The runs' settings on configs/zero_shot.py:runlocal besides the data: the fixture MAE
# (32 px, patch 8), 2 data workers, a panel for every image.
RUN = {"model.checkpoint": FIXTURE_MAE, "data.num_workers": 2, "outputs.panels": -1}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, job_config):
  tmp = tmp_path_factory.mktemp("folder_run")
  fake = data_makers.make_folder(tmp / "raw")
  data = data_makers.folder_fields(fake.root, tmp / "tfds")
  config = job_config("zero_shot", "runlocal", data=data, **RUN)
  summary = zero_shot_job.run(config, tmp / "work")
  return fake, tmp / "work", summary


def test_scores_csv_has_every_good_image_once(folder_run):
  fake, workdir, _ = folder_run
  with open(workdir / "scores.csv") as f:
    rows = list(csv.DictReader(f))
  expected = fake.examples[""]["test"]
  assert sorted(r["file"] for r in rows) == sorted(expected)
  for row in rows:
    assert int(row["label"]) == expected[row["file"]].label
    assert np.isfinite(float(row["score"])) and float(row["score"]) > 0
    assert row["predicted_label"] in ("0", "1")  # Labelled data: an F1 threshold exists.


def test_maps_are_saved_at_each_images_own_resolution(folder_run):
  fake, workdir, _ = folder_run
  for name, expected in fake.examples[""]["test"].items():
    with np.load(workdir / "maps" / "images" / f"{name}.npz") as f:
      assert f["map"].shape == expected.image.shape[:2], name
      assert f["map"].dtype == np.float32 and np.all(f["map"] >= 0)
    overlay = Image.open(workdir / "overlays" / "images" / f"{name}.png")
    assert overlay.size == (expected.image.shape[1], expected.image.shape[0])
    assert (workdir / "panels" / "images" / f"{name}.png").is_file()


def test_reports_and_pictures(folder_run):
  _, workdir, summary = folder_run
  metrics = json.loads((workdir / "metrics.json").read_text())
  category = metrics["per_category"]["images"]
  assert 0.0 <= category["image_auroc"] <= 1.0
  assert 0.0 <= category["pixel_auroc"] <= 1.0
  assert (workdir / "metrics.md").read_text().count("|") > 10
  assert (workdir / "roc" / "images.png").is_file()
  assert list((workdir / "reconstructions").rglob("*.png"))
  assert json.loads((workdir / "config.json").read_text())["num_masks"] == 4
  skipped = {item["path"].rsplit("/", 1)[-1] for item in summary["skipped"]}
  assert {"e.png", "readme.txt", "f.png"} <= skipped


# One process of a two-process run (`jax.distributed` on this machine, one CPU device
# each) of the `folder_run` job: same config, same data, shared data_dir and workdir.
TWO_PROCESS_WORKER = """
import pathlib, sys
import jax

port, pid, raw, tmp = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from maeday_jax.jobs import zero_shot as zero_shot_job
from tests import data_makers
from tests.conftest import make_job_config
from tests.test_main_zero_shot import RUN

raw, tmp = pathlib.Path(raw), pathlib.Path(tmp)
data = data_makers.folder_fields(raw, tmp / "tfds")
zero_shot_job.run(make_job_config("zero_shot", "runlocal", data=data, **RUN), tmp / "work")
"""


def test_two_processes_report_what_one_process_reports(folder_run, tmp_path):
  """Hosts score their own shards; the reports must cover every host's images, exactly
  as a single process scoring everything reports them."""
  fake, single, _ = folder_run
  run_processes(TWO_PROCESS_WORKER, str(fake.root), str(tmp_path))
  two = tmp_path / "work"

  def scores(workdir):
    with open(workdir / "scores.csv") as f:
      return {r["file"]: r for r in csv.DictReader(f)}

  one_rows, two_rows = scores(single), scores(two)
  assert two_rows.keys() == one_rows.keys()
  for name, row in one_rows.items():
    assert two_rows[name]["label"] == row["label"]
    np.testing.assert_allclose(float(two_rows[name]["score"]), float(row["score"]), rtol=1e-5)
  one_metrics, two_metrics = (
    json.loads((w / "metrics.json").read_text())["per_category"]["images"] for w in (single, two)
  )
  for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro"):
    assert two_metrics[key] == pytest.approx(one_metrics[key], abs=1e-4), key
  # Each process wrote the maps and overlays of its own images: together, all of them.
  for name in one_rows:
    assert (two / "maps" / "images" / f"{name}.npz").is_file(), name
    assert (two / "overlays" / "images" / f"{name}.png").is_file(), name


def test_real_magnetic_tiles_end_to_end(mt_sample_dir, tmp_path, job_config):
  data = {"name": "magnetic_tile", "path": mt_sample_dir, "data_dir": tmp_path / "tfds"}
  config = job_config("zero_shot", "runlocal", data=data, **RUN)
  config.outputs.update(overlays=False, panels=2, reconstructions=0)
  zero_shot_job.run(config, tmp_path / "work")
  with open(tmp_path / "work" / "scores.csv") as f:
    rows = list(csv.DictReader(f))
  per_class = {}
  for row in rows:
    per_class.setdefault(row["file"].split("/")[0], []).append(int(row["label"]))
  assert {k: len(v) for k, v in per_class.items()} == {
    "MT_Free": 24,
    "MT_Blowhole": 8,
    "MT_Break": 8,
    "MT_Crack": 8,
    "MT_Fray": 8,
    "MT_Uneven": 8,
  }
  assert set(per_class.pop("MT_Free")) == {0}
  assert all(set(v) == {1} for v in per_class.values())


def _main(*args, cwd=REPO_ROOT):
  return subprocess.run(
    [sys.executable, "-m", "maeday_jax.main", "--config", "configs/zero_shot.py", *args],
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_cli_missing_checkpoint_fails_early_and_clearly(tmp_path):
  result = _main(f"--workdir={tmp_path}", "--config.model.checkpoint=/nowhere/mae.pth")
  assert result.returncode == 2
  assert "/nowhere/mae.pth" in result.stderr and "--config.model.checkpoint" in result.stderr
  assert "Traceback" not in result.stderr


def test_cli_missing_data_fails_early_and_clearly(tmp_path):
  result = _main(
    f"--workdir={tmp_path}",
    "--config.model.checkpoint=random",
    "--config.data.name=folder",
    "--config.data.path=/nowhere/images",
  )
  assert result.returncode == 2
  assert "/nowhere/images" in result.stderr
  assert "Traceback" not in result.stderr

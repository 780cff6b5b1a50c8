"""The few-shot job end to end on a tiny model and a generated folder dataset."""

import csv
import json
import sys

import pytest

from maeday_jax.data import testing
from maeday_jax.jobs import few_shot as few_shot_job
from tests.conftest import REPO_ROOT
from tests.processes import run_processes

sys.path.insert(0, str(REPO_ROOT))
from configs import few_shot as few_shot_config  # noqa: E402


def _config(fixtures_dir, tmp, fake):
  config = few_shot_config.get_config("runlocal")
  config.model.checkpoint = str(fixtures_dir / "mae_ref_a.pth")
  config.data.update(
    name="folder",
    path=str(fake.root / "images"),
    mask_path=str(fake.root / "masks"),
    normal_path=str(fake.root / "normal"),
    data_dir=str(tmp / "tfds"),
    num_workers=2,
  )
  config.train.steps = 3
  config.heldout_normals = 2
  return config


@pytest.fixture(scope="module")
def run(fixtures_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("few_shot_run")
  fake = testing.make_folder(tmp / "raw")
  config = _config(fixtures_dir, tmp, fake)
  summary = few_shot_job.run(config, tmp / "work")
  return config, tmp / "work", summary, fake


def test_reports_mean_and_std_over_seeds(run):
  config, workdir, summary, _ = run
  metrics = json.loads((workdir / "metrics.json").read_text())
  row = metrics["per_category"]["images"]["image_auroc"]
  assert row["num_seeds"] == len(config.seeds) == 2
  assert len(row["values"]) == 2 and 0 <= row["mean"] <= 1 and row["std"] >= 0
  assert "±" in (workdir / "metrics.md").read_text()
  for seed in config.seeds:
    assert (workdir / f"seed_{seed}" / "scores.csv").is_file()
    merged = workdir / f"seed_{seed}" / "adapt" / "images" / "merged" / "mae_config.json"
    assert merged.is_file()


def test_adaptation_record(run):
  config, workdir, _, _ = run
  records = json.loads((workdir / "adaptation.json").read_text())
  assert [r["seed"] for r in records] == list(config.seeds)
  for record in records:
    assert len(record["shots"]) == config.shots
    assert not set(record["shots"]) & set(record["heldout"])
    assert record["heldout_loss_after"] > 0 and record["heldout_loss_before"] > 0
  # The same seed picks the same shot for every method: here, as the data layer says.
  assert records[0]["shots"] != records[1]["shots"] or len(records[0]["heldout"]) < 3


# One process of a two-process run (`jax.distributed`, one CPU device each) of `run`'s job.
TWO_PROCESS_WORKER = """
import pathlib, sys
import jax

port, pid, fixtures, raw, tmp = sys.argv[1:6]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from maeday_jax.data import testing
from maeday_jax.jobs import few_shot as few_shot_job
from tests.test_main_few_shot import _config

fake = testing.FakeDataset(pathlib.Path(raw))
config = _config(pathlib.Path(fixtures), pathlib.Path(tmp), fake)
few_shot_job.run(config, pathlib.Path(tmp) / "work")
"""


def test_two_processes_adapt_and_report_like_one(run, fixtures_dir, tmp_path):
  """Shots, training (data-parallel over both hosts), the merged model written once,
  scoring and reports: the same scores as the single-process run."""
  config, single, _, fake = run
  run_processes(TWO_PROCESS_WORKER, str(fixtures_dir), str(fake.root), str(tmp_path))
  two = tmp_path / "work"
  for seed in config.seeds:

    def scores(workdir, seed=seed):
      with open(workdir / f"seed_{seed}" / "scores.csv") as f:
        return {r["file"]: float(r["score"]) for r in csv.DictReader(f)}

    one_scores, two_scores = scores(single), scores(two)
    assert two_scores.keys() == one_scores.keys()
    for name, value in one_scores.items():
      assert two_scores[name] == pytest.approx(value, rel=1e-4), (seed, name)
    merged = two / f"seed_{seed}" / "adapt" / "images" / "merged" / "mae_config.json"
    assert merged.is_file()
  one_records, two_records = (
    json.loads((w / "adaptation.json").read_text()) for w in (single, two)
  )
  assert [r["shots"] for r in two_records] == [r["shots"] for r in one_records]

"""The few-shot job end to end on a tiny model and a generated folder dataset."""

import csv
import json

import pytest

from maeday_jax.jobs import few_shot as few_shot_job
from tests import data_makers
from tests.conftest import FIXTURE_MAE
from tests.processes import run_processes

# The runs' settings on configs/few_shot.py:runlocal besides the data: the fixture MAE
# (32 px, patch 8) in float32 (one and two processes split the batch differently, which
# bfloat16 rounds differently), 2 data workers, 3 training steps, 2 held-out normal images.
RUN = {
  "model.checkpoint": FIXTURE_MAE,
  "model.dtype": "float32",
  "data.num_workers": 2,
  "train.steps": 3,
  "heldout_normals": 2,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, job_config):
  tmp = tmp_path_factory.mktemp("few_shot_run")
  fake = data_makers.make_folder(tmp / "raw")
  data = data_makers.folder_fields(fake.root, tmp / "tfds")
  config = job_config("few_shot", "runlocal", data=data, **RUN)
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

port, pid, raw, tmp = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from maeday_jax.jobs import few_shot as few_shot_job
from tests import data_makers
from tests.conftest import make_job_config
from tests.test_main_few_shot import RUN

raw, tmp = pathlib.Path(raw), pathlib.Path(tmp)
data = data_makers.folder_fields(raw, tmp / "tfds")
few_shot_job.run(make_job_config("few_shot", "runlocal", data=data, **RUN), tmp / "work")
"""


def test_two_processes_adapt_and_report_like_one(run, tmp_path):
  """Shots, training (data-parallel over both hosts), the merged model written once,
  scoring and reports: the same scores as the single-process run."""
  config, single, _, fake = run
  run_processes(TWO_PROCESS_WORKER, str(fake.root), str(tmp_path))
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

"""The few-shot job end to end on a tiny model and a generated folder dataset."""

import json
import sys

import pytest

from maeday_jax.data import testing
from maeday_jax.jobs import few_shot as few_shot_job
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))
from configs import few_shot as few_shot_config  # noqa: E402


@pytest.fixture(scope="module")
def run(fixtures_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("few_shot_run")
  fake = testing.make_folder(tmp / "raw")
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
  summary = few_shot_job.run(config, tmp / "work")
  return config, tmp / "work", summary


def test_reports_mean_and_std_over_seeds(run):
  config, workdir, summary = run
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
  config, workdir, _ = run
  records = json.loads((workdir / "adaptation.json").read_text())
  assert [r["seed"] for r in records] == list(config.seeds)
  for record in records:
    assert len(record["shots"]) == config.shots
    assert not set(record["shots"]) & set(record["heldout"])
    assert record["heldout_loss_after"] > 0 and record["heldout_loss_before"] > 0
  # The same seed picks the same shot for every method: here, as the data layer says.
  assert records[0]["shots"] != records[1]["shots"] or len(records[0]["heldout"]) < 3

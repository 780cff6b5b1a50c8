"""The VAND summary in a real job's reports: the evaluate job with the zero-shot CLIP
detector (the tiny random `clip_test`) on `data_makers.make_folder`'s images writes a
`vand_score` per category, its mean, and the VAND line in metrics.md."""

from __future__ import annotations

import json

import pytest

from maeday_jax import defaults
from maeday_jax.jobs import evaluate as evaluate_job
from tests import data_makers


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("clip_eval")
  fake = data_makers.make_folder(tmp / "raw")
  config = defaults.evaluate_config("runlocal")
  config.detector = "clip_zero_shot"
  config.data.update(data_makers.folder_fields(fake.root, tmp / "tfds"))
  config.data.num_workers = 2
  config.outputs.update(overlays=False, panels=0, reconstructions=0)
  summary = evaluate_job.run(config, tmp / "work")
  return tmp / "work", summary


def test_a_jobs_metrics_json_and_md_carry_the_vand_score(clip_run):
  workdir, summary = clip_run
  written = json.loads((workdir / "metrics.json").read_text())
  row = written["per_category"]["images"]
  image, pixel = row["image_f1_max"], row["pixel_f1_max"]
  assert image is not None and pixel is not None
  assert row["vand_score"] == pytest.approx(2 * image * pixel / (image + pixel))
  assert written["groups"]["all"]["mean"]["vand_score"] == pytest.approx(row["vand_score"])
  assert written["vand_score"] == pytest.approx(row["vand_score"])
  assert "harmonic mean" in written["vand_definition"]
  assert summary["vand_score"] == written["vand_score"]
  text = (workdir / "metrics.md").read_text()
  assert f"VAND score: {100 * row['vand_score']:.1f} (" in text

"""The few-shot job with every method on the same shots: MAEDAY, PatchCore, 2 x PatchCore,
the MAEDAY + PatchCore ensemble, AnomalyDINO and MAEDAY + AnomalyDINO (tiny random
backbones and fixture MAE)."""

import csv
import json

import numpy as np
import pytest

from maeday_jax import ensemble
from maeday_jax.jobs import few_shot as few_shot_job
from tests import data_makers
from tests.test_main_few_shot import RUN

METHODS = ("maeday", "patchcore", "patchcore_x2", "ensemble", "anomalydino", "maeday_anomalydino")


@pytest.fixture(scope="module")
def run(tmp_path_factory, job_config):
  tmp = tmp_path_factory.mktemp("methods_run")
  fake = data_makers.make_folder(tmp / "raw")
  data = data_makers.folder_fields(fake.root, tmp / "tfds")
  config = job_config("few_shot", "runlocal", data=data, **RUN)
  config.seeds = (0,)
  config.train.steps = 2
  config.method = ",".join(METHODS)
  summary = few_shot_job.run(config, tmp / "work")
  return config, tmp / "work", summary


def _scores(path) -> dict[str, float]:
  with open(path) as f:
    return {r["file"]: float(r["score"]) for r in csv.DictReader(f)}


def test_every_method_scores_the_same_images(run):
  _, workdir, summary = run
  assert list(summary["methods"]) == list(METHODS)
  files = None
  for method in METHODS:
    scores = _scores(workdir / "seed_0" / method / "scores.csv")
    assert all(np.isfinite(list(scores.values())))
    files = files or set(scores)
    assert set(scores) == files
  table = (workdir / "metrics.md").read_text()
  titles = ("MAEDAY image AUROC", "PC image AUROC", "2 x PC image AUROC", "MAEDAY + PC")
  for title in (*titles, "AnomalyDINO image AUROC", "MAEDAY + AnomalyDINO image AUROC"):
    assert title in table
  # The shown images' maps of every method, side by side.
  assert list((workdir / "seed_0" / "comparison" / "images").rglob("*.png"))


# (maeday_anomalydino is not recomputed this way: its members read images at 32 and 56 px,
# the ensemble reads them once at 56 and resizes on device, so its MAEDAY member's inputs
# are not the single MAEDAY's.)
@pytest.mark.parametrize("combo, members", [("ensemble", ("maeday", "patchcore"))])
def test_the_ensemble_is_the_standardised_sum_of_its_members(run, combo, members):
  """Recomputed from the members' own scores.csv and the recorded held-out statistics."""
  _, workdir, _ = run
  record = json.loads((workdir / "adaptation.json").read_text())[0]
  notes = record["ensemble_normalization"]
  expected = None
  for member in members:
    stats = notes[f"{combo}/{member}"]
    assert isinstance(stats, dict), stats  # Fitted on held-out normals, not the raw sum.
    scores = _scores(workdir / "seed_0" / member / "scores.csv")
    part = {f: (s - stats["score_mean"]) / stats["score_std"] for f, s in scores.items()}
    expected = part if expected is None else {f: expected[f] + part[f] for f in part}
  got = _scores(workdir / "seed_0" / combo / "scores.csv")
  for name, value in expected.items():
    assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-4), name


def test_standardization_matches_numpy():
  rng = np.random.default_rng(0)
  maps, scores = rng.normal(3, 2, (4, 5, 5)), rng.normal(1, 0.5, 4)
  norm = ensemble.Standardization.fit(maps, scores)
  assert norm.map_mean == pytest.approx(maps.mean()) and norm.map_std == pytest.approx(maps.std())
  assert norm.score_std == pytest.approx(scores.std())
  assert ensemble.Standardization.fit(maps[:1], scores[:1]) is None  # One image: no spread.
  other = ensemble.Standardization(1.0, 2.0, 3.0, 4.0)
  m, s = ensemble.combine([(maps, scores), (maps * 2, scores * 2)], [norm, other])
  np.testing.assert_allclose(
    s, (scores - scores.mean()) / scores.std() + (scores * 2 - 3.0) / 4.0, rtol=1e-12
  )
  np.testing.assert_allclose(m, (maps - maps.mean()) / maps.std() + (maps * 2 - 1.0) / 2.0)

"""The bulk job with a fitted detector artifact: SIGKILLed and resumed, exactly once.

A PatchCore artifact (tiny random-weight backbone) is fitted in-process on a folder of
normal images; the job then scores another folder with it as a command, is SIGKILLed
after its first commit (a named pipe holds it in its third batch) and is resumed: the
rows are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import pathlib

import numpy as np
from PIL import Image

from maeday_jax import defaults
from maeday_jax.jobs import fit as fit_job
from maeday_jax.jobs import score as score_job
from tests import data_makers
from tests.bulk_kill import blocking_copy, run_and_kill, unblock

SIZE = 40


def _rows(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "scores.csv", newline="") as f:
    return list(csv.DictReader(f))


def _fit_patchcore(tmp_path) -> pathlib.Path:
  """Fits PatchCore on 4 smooth normal textures (2 shots, 2 held out); its artifact."""
  rng = np.random.default_rng(0)
  base = np.linspace(60, 180, SIZE, dtype=np.float32)[None, :, None]
  for folder, count in (("normal", 4), ("test", 2)):
    (tmp_path / folder).mkdir()
    for i in range(count):
      noise = rng.normal(0, 12, size=(SIZE, SIZE, 3))
      pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(tmp_path / folder / f"{folder}{i}.png")
  config = defaults.fit_config("runlocal")
  config.detector = "patchcore"
  config.data.update(
    {
      "name": "folder",
      "path": str(tmp_path / "test"),
      "normal_path": str(tmp_path / "normal"),
      "data_dir": str(tmp_path / "tfds"),
      "num_workers": 2,
    }
  )
  config.shots = 2
  config.heldout_normals = 2
  fit_job.run(config, tmp_path / "fit")
  return tmp_path / "fit" / fit_job.ARTIFACT_DIR


def test_killed_patchcore_run_resumes_to_exactly_the_uninterrupted_rows(tmp_path, job_config):
  detector = _fit_patchcore(tmp_path)
  names = [f"img_{i:03d}.png" for i in range(30)]
  reference = tmp_path / "reference"
  for i, name in enumerate(names):
    data_makers.write_image(reference / name, "rgb" if i % 3 else "gray")
  # The run waits in its third batch of 8, after committing the first.
  killed = blocking_copy(reference, tmp_path / "killed", names, [names[18]])
  # The fields `run_and_kill` sets on the command line (`COMMON_ARGS`): the resumed run
  # must be the same run (config.json).
  run = {"detector": str(detector), "data.num_workers": 2, "commit_every": 1}
  run["compilation_cache_dir"] = ""
  config = job_config("score", "runlocal", data={"path": reference / "list.txt"}, **run)
  score_job.run(config, tmp_path / "reference_work")

  workdir = tmp_path / "work"
  log = tmp_path / "killed.log"
  record = run_and_kill(workdir, killed / "list.txt", log, 1, f"--config.detector={detector}")
  assert record["parts"] >= 1 and not record["done"], log.read_text()[-2000:]
  assert not (workdir / "scores.csv").exists()
  first_part = workdir / "shards/process_0/part_0.csv"
  written = first_part.stat().st_mtime_ns
  unblock(killed, reference, names[18])

  config = job_config("score", "runlocal", data={"path": killed / "list.txt"}, **run)
  summary = score_job.run(config, workdir)
  resumed, expected = _rows(workdir), _rows(tmp_path / "reference_work")
  assert resumed == expected  # Same files, same order, identical scores, no duplicates.
  assert [r["file"] for r in resumed] == names and summary["images"] == len(names)
  scores = np.array([float(r["score"]) for r in resumed])
  assert np.isfinite(scores).all() and np.ptp(scores) > 0
  # The killed run's committed rows are kept: the resume went on from its record.
  assert first_part.stat().st_mtime_ns == written
  assert json.loads((workdir / "shards/process_0/progress.json").read_text())["parts"] == 4

"""Bulk scoring: listing and sharding, bad files, kill and resume, changed lists, two hosts."""

import csv
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from maeday_jax.bulk import engine, source
from maeday_jax.config_errors import ConfigError
from maeday_jax.data import testing
from maeday_jax.jobs import score as score_job
from tests.conftest import REPO_ROOT
from tests.processes import run_processes

sys.path.insert(0, str(REPO_ROOT))
from configs import score as score_config  # noqa: E402

GOOD = [f"line{i % 3}/{i:03d}.png" for i in range(11)]  # 11 + 2 bad: uneven shards.


def _config(path, **fields):
  config = score_config.get_config("runlocal")  # Tiny random-weight model, 4 masks.
  config.data.path = str(path)
  config.data.num_workers = 2
  config.commit_every = 1
  config.compilation_cache_dir = ""  # Leaves this test process's JAX settings alone.
  for key, value in fields.items():
    config[key] = value
  return config


def _rows(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "scores.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
  """A folder of good images in sub-folders, a truncated file and a text file named .png."""
  tmp = tmp_path_factory.mktemp("bulk_folder")
  images = tmp / "images"
  for i, name in enumerate(GOOD):
    testing.write_image(images / name, "rgb" if i % 2 else "gray")
  testing.write_truncated(images / "line0/bad.png")
  testing.write_not_image(images / "note.png")
  testing.write_not_image(images / "readme.txt")  # Not an image suffix: not listed.
  summary = score_job.run(_config(images), tmp / "work")
  return images, tmp / "work", summary


def test_listing_and_sharding_ten_thousand_paths_is_fast(tmp_path):
  names = [f"batch{i % 7}/img_{i:05d}.jpg" for i in range(10_000)]
  random.Random(0).shuffle(names)
  manifest = tmp_path / "list.txt"
  manifest.write_text("# images to score\n" + "\n".join(names) + "\n\n")
  start = time.perf_counter()
  listing = source.list_source(str(manifest))
  shards = [listing.shard(i, 7) for i in range(7)]
  elapsed = time.perf_counter() - start
  assert elapsed < 1.0, elapsed
  assert not any(os.path.exists(p) for p in listing.paths[:10])  # Nothing was opened.
  assert listing.kind == "manifest" and listing.files == sorted(names)
  assert listing.paths[0] == str(tmp_path / listing.files[0])  # Relative to the manifest.
  covered = [i for s in shards for i in range(s.start, s.stop)]
  assert covered == list(range(10_000))  # Disjoint, contiguous, covering.
  assert max(map(len, shards)) - min(map(len, shards)) <= 1
  assert listing.fingerprint == source.Fingerprint.of(sorted(names))
  assert listing.fingerprint != source.Fingerprint.of(sorted(names)[1:])


def test_folder_glob_and_csv_manifest_listings(tmp_path):
  root = tmp_path / "root"
  for name in ["a.png", "sub/b.JPG", "sub/deep/c.png", ".hidden.png", "notes.txt"]:
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(b"")
  pattern = source.list_source(str(root / "**" / "*.png"))
  assert pattern.kind == "glob"
  assert pattern.files == sorted([str(root / "a.png"), str(root / "sub/deep/c.png")])
  os.symlink(root, root / "sub" / "loop")  # Back to the root: listed once.
  os.symlink(root / "gone.png", root / "broken.png")
  folder = source.list_source(str(root))
  assert folder.files == ["a.png", "sub/b.JPG", "sub/deep/c.png"]
  assert {name for name, _ in folder.skipped} == {"broken.png", "sub/loop"}
  manifest = tmp_path / "m.csv"
  manifest.write_text("path,label,mask\nsub/b.JPG,1,m/b.png\n/abs/x.png,,\na.png,0,\na.png,0,\n")
  listed = source.list_source(str(manifest))
  assert listed.files == ["/abs/x.png", "a.png", "sub/b.JPG"] and listed.duplicates == 1
  assert listed.labels == [-1, 0, 1]
  assert listed.paths == ["/abs/x.png", str(tmp_path / "a.png"), str(tmp_path / "sub/b.JPG")]
  assert listed.masks == ["", "", str(tmp_path / "m/b.png")]
  (tmp_path / "bad.csv").write_text("file\nx.png\n")
  with pytest.raises(ConfigError, match="no 'path' column"):
    source.list_source(str(tmp_path / "bad.csv"))
  with pytest.raises(ConfigError, match="not a folder"):
    source.list_source(str(tmp_path / "nowhere"))


def test_bad_files_are_skipped_with_reasons_and_the_rest_scored(folder_run):
  _, workdir, summary = folder_run
  rows = _rows(workdir)
  assert [r["file"] for r in rows] == sorted(GOOD)
  assert all(np.isfinite(float(r["score"])) and float(r["score"]) > 0 for r in rows)
  written = json.loads((workdir / "summary.json").read_text())
  assert written == summary and summary["images"] == len(GOOD) and summary["listed"] == 13
  reasons = {s["file"]: s["reason"] for s in summary["skipped"]}
  assert set(reasons) == {"line0/bad.png", "note.png"}
  assert "truncated" in reasons["line0/bad.png"] and "not an image" in reasons["note.png"]
  assert summary["processes"][0]["images_per_second"] > 0


def test_rerun_of_a_finished_run_does_no_work(folder_run, monkeypatch):
  images, workdir, summary = folder_run
  before = {p.name: p.stat().st_mtime_ns for p in (workdir / "shards/process_0").iterdir()}

  def no_model(*args, **kwargs):
    raise AssertionError("a finished run must not load the model")

  monkeypatch.setattr(score_job.common, "load_model", no_model)
  again = score_job.run(_config(images), workdir)
  after = {p.name: p.stat().st_mtime_ns for p in (workdir / "shards/process_0").iterdir()}
  assert after == before
  assert again["images"] == summary["images"] and again["skipped"] == summary["skipped"]


def test_changed_file_list_or_process_count_is_refused(tmp_path):
  for name in GOOD[:3]:
    testing.write_image(tmp_path / "images" / name)
  manifest = tmp_path / "list.txt"
  manifest.write_text("\n".join(f"images/{n}" for n in GOOD[:3]))
  config, workdir = _config(manifest), tmp_path / "work"
  score_job.run(config, workdir)
  record = workdir / "shards/process_0/progress.json"
  finished = record.read_text()
  record.write_text(finished.replace('"process_count": 1', '"process_count": 2'))
  with pytest.raises(ConfigError, match=r"scored by 2 process\(es\), this run has 1"):
    score_job.run(config, workdir)
  record.write_text(finished)
  testing.write_image(tmp_path / "images/extra.png")
  manifest.write_text(manifest.read_text() + "\nimages/extra.png\n")
  with pytest.raises(ConfigError, match=r"changed since this run began: it had 3 files .* 4 files"):
    score_job.run(config, workdir)


def test_killed_run_resumes_to_exactly_the_uninterrupted_scores(tmp_path):
  """SIGKILL after the first commit, then rerun: the same rows as one uninterrupted run."""
  names = [f"img_{i:03d}.png" for i in range(30)]
  blocked = names[18]  # In the third batch of 8: the run waits there, after one commit.
  reference, killed = tmp_path / "reference", tmp_path / "killed"
  for name in names:
    testing.write_image(reference / name)
  shutil.copytree(reference, killed)
  (killed / blocked).unlink()
  os.mkfifo(killed / blocked)  # Reading it blocks until the test is done killing.
  for folder in (reference, killed):
    (folder / "list.txt").write_text("\n".join(names))
  score_job.run(_config(reference / "list.txt"), tmp_path / "reference_work")

  workdir = tmp_path / "work"
  args = [
    *("-m", "maeday_jax.main", "--config", "configs/score.py:runlocal", "--workdir"),
    *(str(workdir), f"--config.data.path={killed / 'list.txt'}", "--config.commit_every=1"),
    *("--config.compilation_cache_dir=", "--config.data.num_workers=2"),
  ]
  with open(tmp_path / "killed.log", "w") as log:
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, stdout=log, stderr=log)
  shard = workdir / "shards/process_0"
  try:
    deadline = time.monotonic() + 240
    while not (shard / "part_0.csv").exists():
      assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
      assert time.monotonic() < deadline, "no commit within 240 s"
      time.sleep(0.05)
    time.sleep(0.5)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  record = json.loads((shard / "progress.json").read_text())
  assert record["parts"] >= 1 and not record["done"]
  assert not (workdir / "scores.csv").exists()
  # A kill between a part and its record leaves a part the record does not count.
  (shard / f"part_{record['parts']}.csv").write_text("index,file,score,label\n0,x,1.0,\n")
  (killed / blocked).unlink()
  shutil.copy(reference / blocked, killed / blocked)

  summary = score_job.run(_config(killed / "list.txt"), workdir)
  resumed, expected = _rows(workdir), _rows(tmp_path / "reference_work")
  assert resumed == expected  # Same files, same order, identical scores, no duplicates.
  assert [r["file"] for r in resumed] == names and summary["images"] == len(names)


# One process of a two-process run with 4 simulated CPU devices each (8 in all, as the
# in-process runs have), on the `folder_run` images.
TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax

port, pid, images, workdir = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
assert jax.local_device_count() == 4 and jax.device_count() == 8
from maeday_jax.jobs import score
from tests.test_bulk import _config

score.run(_config(images), workdir)
"""


def test_two_processes_write_exactly_the_rows_of_one(folder_run, tmp_path):
  images, single, one = folder_run
  run_processes(TWO_PROCESS_WORKER, str(images), str(tmp_path / "work"))
  two = json.loads((tmp_path / "work" / "summary.json").read_text())
  assert [p["images"] for p in two["processes"]] == [5, 6]  # 13 listed, 2 skipped.
  assert two["skipped"] == one["skipped"]
  one_rows, two_rows = _rows(single), _rows(tmp_path / "work")
  assert [r["file"] for r in two_rows] == [r["file"] for r in one_rows]
  np.testing.assert_allclose(
    [float(r["score"]) for r in two_rows], [float(r["score"]) for r in one_rows], rtol=1e-5
  )
  assert (tmp_path / "work/shards/process_1/progress.json").is_file()
  assert engine.SCORES_FILE == "scores.csv"


def test_compilation_cache_defaults_to_the_workdir(tmp_path):
  config = score_config.get_config("runlocal")
  assert config.commit_every == 50 and "outputs" not in config
  assert score_job.compilation_cache_dir(config, tmp_path) == str(tmp_path / "jax_cache")
  config.compilation_cache_dir = ""
  assert score_job.compilation_cache_dir(config, tmp_path) == ""
  config.compilation_cache_dir = str(tmp_path / "shared_cache")
  assert score_job.compilation_cache_dir(config, tmp_path) == str(tmp_path / "shared_cache")

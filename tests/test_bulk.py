"""Bulk scoring: listing and sharding, bad files, kill and resume, changed lists, two hosts."""

import csv
import io
import json
import os
import pathlib
import random
import time

import numpy as np
import pytest
from PIL import Image

from maeday_jax import input_wait, metrics
from maeday_jax.bulk import engine, maps_store, progress_line, source
from maeday_jax.config_errors import ConfigError
from maeday_jax.jobs import score as score_job
from tests import data_makers
from tests.bulk_kill import blocking_copy, run_and_kill, unblock
from tests.processes import run_processes

GOOD = [f"line{i % 3}/{i:03d}.png" for i in range(11)]  # 11 + 2 bad: uneven shards.


# The runs' settings besides `data.path`, on configs/score.py:runlocal (a tiny
# random-weight model, 4 masks): a commit after every batch, and no compilation cache,
# which leaves this test process's JAX settings alone.
RUN = {"data.num_workers": 2, "commit_every": 1, "compilation_cache_dir": ""}


def _rows(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "scores.csv", newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, job_config):
  """A folder of good images in sub-folders, a truncated file and a text file named .png."""
  tmp = tmp_path_factory.mktemp("bulk_folder")
  images = tmp / "images"
  for i, name in enumerate(GOOD):
    data_makers.write_image(images / name, "rgb" if i % 2 else "gray")
  data_makers.write_truncated(images / "line0/bad.png")
  data_makers.write_not_image(images / "note.png")
  data_makers.write_not_image(images / "readme.txt")  # Not an image suffix: not listed.
  summary = score_job.run(
    job_config("score", "runlocal", data={"path": images}, **RUN), tmp / "work"
  )
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
  # An empty mask column is no mask (mask files are refused: tests/test_bulk_trust.py).
  manifest.write_text("path,label,mask\nsub/b.JPG,1,\n/abs/x.png,,\na.png,0,\na.png,0,\n")
  listed = source.list_source(str(manifest))
  assert listed.files == ["/abs/x.png", "a.png", "sub/b.JPG"] and listed.duplicates == 1
  assert listed.labels == [-1, 0, 1]
  assert listed.paths == ["/abs/x.png", str(tmp_path / "a.png"), str(tmp_path / "sub/b.JPG")]
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
  # Loading the model and compiling come before the first scores, within the run.
  assert 0 < summary["startup_seconds"] == summary["processes"][0]["startup_seconds"]
  assert summary["startup_seconds"] < summary["wall_seconds"] + 60
  process = summary["processes"][0]
  assert 0 <= process["input_wait_seconds"] <= process["seconds"]
  assert 0 <= summary["input_share"] == process["input_share"] <= 1


def test_a_run_held_up_by_its_input_says_so(tmp_path, job_config, monkeypatch, caplog):
  """The time spent waiting for batches is measured where the job waits: a reader that
  takes 1.5 s per batch of 8 (a slow disk) shows as most of the scoring time, with a warning
  naming what to change; the shares are the recorded waits over the recorded seconds."""
  images = tmp_path / "images"
  for i in range(24):
    data_makers.write_image(images / f"{i:02d}.png", "rgb")
  read_batches = engine.reader.read_batches

  def slow(*args, **kwargs):
    for batch in read_batches(*args, **kwargs):
      time.sleep(1.5)
      yield batch

  monkeypatch.setattr(engine.reader, "read_batches", slow)
  config = job_config("score", "runlocal", data={"path": images}, batch_size=8, **RUN)
  summary = score_job.run(config, tmp_path / "work")
  process = summary["processes"][0]
  # 3 batches read at 1.5 s each, every commit adding only its own window's wait.
  assert 3 * 1.5 <= process["input_wait_seconds"] < 3 * 1.5 + 2.0
  assert process["input_wait_seconds"] <= process["seconds"]
  assert summary["input_share"] == process["input_share"] > input_wait.INPUT_BOUND_SHARE
  assert "Raise --config.data.num_workers (now 2)" in caplog.text
  assert input_wait.input_bound_warning(1.0, 10.0, 4) is None  # 10 %: nothing to say.


def test_each_host_has_one_progress_line_that_a_log_file_can_read():
  lines = io.StringIO()  # Not a terminal: plain ASCII, refreshed at most every 30 s.
  with progress_line.host_progress(11, 4, host=1, hosts=3, file=lines) as bar:
    for _ in range(7):
      bar.update(1)
  text = lines.getvalue()
  assert "scoring (host 2/3)" in text and "11/11" in text and "img/s" in text
  assert text.isascii() and "4/11" in text  # A resumed run starts from what is committed.
  one = io.StringIO()
  with progress_line.host_progress(3, 0, host=0, hosts=1, file=one) as bar:
    bar.update(3)
  assert one.getvalue().lstrip("\r").startswith("scoring: ")


def test_rerun_of_a_finished_run_does_no_work(folder_run, monkeypatch, job_config):
  images, workdir, summary = folder_run
  before = {p.name: p.stat().st_mtime_ns for p in (workdir / "shards/process_0").iterdir()}

  def no_model(*args, **kwargs):
    raise AssertionError("a finished run must not load the model")

  monkeypatch.setattr(score_job.detector_choice, "load", no_model)
  again = score_job.run(job_config("score", "runlocal", data={"path": images}, **RUN), workdir)
  after = {p.name: p.stat().st_mtime_ns for p in (workdir / "shards/process_0").iterdir()}
  assert after == before
  assert again["images"] == summary["images"] and again["skipped"] == summary["skipped"]


def test_changed_file_list_or_process_count_is_refused(tmp_path, job_config):
  for name in GOOD[:3]:
    data_makers.write_image(tmp_path / "images" / name)
  manifest = tmp_path / "list.txt"
  manifest.write_text("\n".join(f"images/{n}" for n in GOOD[:3]))
  config = job_config("score", "runlocal", data={"path": manifest}, **RUN)
  workdir = tmp_path / "work"
  score_job.run(config, workdir)
  record = workdir / "shards/process_0/progress.json"
  finished = record.read_text()
  record.write_text(finished.replace('"process_count": 1', '"process_count": 2'))
  with pytest.raises(ConfigError, match=r"scored by 2 process\(es\), this run has 1"):
    score_job.run(config, workdir)
  record.write_text(finished)
  data_makers.write_image(tmp_path / "images/extra.png")
  manifest.write_text(manifest.read_text() + "\nimages/extra.png\n")
  with pytest.raises(ConfigError, match=r"changed since this run began: it had 3 files .* 4 files"):
    score_job.run(config, workdir)


def test_killed_run_resumes_to_exactly_the_uninterrupted_scores(tmp_path, job_config):
  """SIGKILL after the first commits, rerun, SIGKILL again, rerun: the same rows as one
  uninterrupted run."""
  names = [f"img_{i:03d}.png" for i in range(30)]
  # Reading a named pipe blocks until the test replaces it: the first run waits in the
  # third batch of 8 (after its first commit), the second in the fourth.
  first_block, second_block = names[18], names[26]
  reference = tmp_path / "reference"
  for name in names:
    data_makers.write_image(reference / name)
  killed = blocking_copy(reference, tmp_path / "killed", names, [first_block, second_block])
  maps = {"outputs.maps": "uint8"}
  config = job_config("score", "runlocal", data={"path": reference / "list.txt"}, **RUN, **maps)
  score_job.run(config, tmp_path / "reference_work")

  workdir = tmp_path / "work"
  shard = workdir / "shards/process_0"
  uint8 = "--config.outputs.maps=uint8"
  record = run_and_kill(workdir, killed / "list.txt", tmp_path / "killed1.log", 1, uint8)
  assert record["parts"] >= 1 and not record["done"]
  assert not (workdir / "scores.csv").exists()
  unblock(killed, reference, first_block)
  # The engine commits a batch once the next one is on its way: the second run commits
  # the second batch, then waits for the fourth's pipe before committing the third.
  second = run_and_kill(workdir, killed / "list.txt", tmp_path / "killed2.log", 2, uint8)
  assert second["parts"] > record["parts"] and not second["done"]
  # A kill between a part and its record leaves a part the record does not count.
  (shard / f"part_{second['parts']}.csv").write_text("index,file,score,label\n0,x,1.0,\n")
  maps_store.write_shard(shard / f"maps_{second['parts']}.npz", np.ones((1, 2, 2)), ["x"], "uint8")
  unblock(killed, reference, second_block)

  config = job_config("score", "runlocal", data={"path": killed / "list.txt"}, **RUN, **maps)
  summary = score_job.run(config, workdir)
  resumed, expected = _rows(workdir), _rows(tmp_path / "reference_work")
  assert resumed == expected  # Same files, same order, identical scores, no duplicates.
  assert [r["file"] for r in resumed] == names and summary["images"] == len(names)
  # The input waits add up over the runs, as the scoring seconds do, never beyond them.
  waits = [record["input_wait_seconds"], second["input_wait_seconds"]]
  process = summary["processes"][0]
  assert 0 <= waits[0] <= waits[1] <= process["input_wait_seconds"] <= process["seconds"]
  with open(workdir / "maps_index.csv", newline="") as f:
    index = list(csv.DictReader(f))
  assert [e["file"] for e in index] == names  # Every image's map once, none of the stale.
  assert len({(e["shard"], e["row"]) for e in index}) == len(names)
  loaded = maps_store.load_maps(workdir, names)
  for row in resumed:  # A score is its map's maximum: uint8 keeps the maximum exactly.
    values = loaded[row["file"]]
    assert values.ndim == 2 and values.dtype == np.float32
    np.testing.assert_allclose(values.max(), float(row["score"]), rtol=1e-5)
  np.testing.assert_allclose(
    maps_store.load_map(workdir, names[3]),
    maps_store.load_map(tmp_path / "reference_work", names[3]),
    rtol=1e-6,
  )


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
from tests.conftest import make_job_config
from tests.test_bulk import RUN

maps = {"maps": "float16"}
score.run(make_job_config("score", "runlocal", data={"path": images}, outputs=maps, **RUN), workdir)
"""


def test_two_processes_write_exactly_the_rows_of_one(folder_run, tmp_path):
  images, single, one = folder_run
  run_processes(TWO_PROCESS_WORKER, str(images), str(tmp_path / "work"))
  two = json.loads((tmp_path / "work" / "summary.json").read_text())
  assert [p["images"] for p in two["processes"]] == [5, 6]  # 13 listed, 2 skipped.
  assert all(p["startup_seconds"] > 0 for p in two["processes"])  # Each host's own.
  assert two["skipped"] == one["skipped"]
  one_rows, two_rows = _rows(single), _rows(tmp_path / "work")
  assert [r["file"] for r in two_rows] == [r["file"] for r in one_rows]
  np.testing.assert_allclose(
    [float(r["score"]) for r in two_rows], [float(r["score"]) for r in one_rows], rtol=1e-5
  )
  assert (tmp_path / "work/shards/process_1/progress.json").is_file()
  with open(tmp_path / "work/maps_index.csv", newline="") as f:
    index = list(csv.DictReader(f))
  assert [e["file"] for e in index] == [r["file"] for r in two_rows]
  assert {e["shard"].split("/")[1] for e in index} == {"process_0", "process_1"}
  for row in two_rows[::4]:  # Each process's maps are its own rows' maps.
    values = maps_store.load_map(tmp_path / "work", row["file"])
    np.testing.assert_allclose(values.max(), float(row["score"]), rtol=1e-3)
  assert engine.SCORES_FILE == "scores.csv"


def test_compilation_cache_defaults_to_the_workdir(tmp_path, job_config):
  config = job_config("score", "runlocal")
  assert config.commit_every == 50 and config.threshold.method == "none"
  assert config.outputs.maps == "none" and config.outputs.top_pictures == 0
  assert score_job.compilation_cache_dir(config, tmp_path) == str(tmp_path / "jax_cache")
  config.compilation_cache_dir = ""
  assert score_job.compilation_cache_dir(config, tmp_path) == ""
  config.compilation_cache_dir = str(tmp_path / "shared_cache")
  assert score_job.compilation_cache_dir(config, tmp_path) == str(tmp_path / "shared_cache")


def test_maps_round_trip_in_both_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  maps = rng.gamma(2.0, 0.01, size=(5, 16, 12)).astype(np.float32)
  maps[2] = 0.25  # A constant map.
  names = [f"dir/{i}.png" for i in range(5)]
  for dtype in ("uint8", "float16"):
    path = maps_store.write_shard(tmp_path / f"{dtype}.npz", maps, names, dtype)
    with np.load(path, allow_pickle=False) as arrays:
      assert arrays["maps"].dtype == np.dtype(dtype) and arrays["maps"].shape == maps.shape
      assert sorted(arrays.files) == (
        ["files", "maps", "offset", "scale"] if dtype == "uint8" else ["files", "maps"]
      )
      decoded = maps_store.decode(arrays)
      if dtype == "uint8":
        scale = arrays["scale"][:, None, None]
        assert np.all(np.abs(decoded - maps) <= scale / 255 + 1e-7)
      else:
        np.testing.assert_allclose(decoded, maps, rtol=1e-3)
    assert maps_store.shard_files(path) == names
  maps_store.write_index(tmp_path, [(n, "uint8.npz", r) for r, n in enumerate(names)])
  np.testing.assert_allclose(
    maps_store.load_map(tmp_path, "dir/3.png"), maps[3], atol=maps[3].max() / 255
  )
  with pytest.raises(KeyError, match="lists no map"):
    maps_store.load_map(tmp_path, "dir/9.png")


def test_threshold_and_output_fields_are_validated(tmp_path, job_config):
  config = job_config(
    "score", "runlocal", data={"path": tmp_path}, **RUN, threshold={"method": "f1"}
  )
  with pytest.raises(ConfigError, match=r"threshold\.method: 'f1'"):
    score_job.validate(config)
  config = job_config(
    "score", "runlocal", data={"path": tmp_path}, **RUN, outputs={"maps": "float32"}
  )
  with pytest.raises(ConfigError, match=r"outputs\.maps"):
    score_job.validate(config)
  config = job_config(
    "score", "runlocal", data={"path": tmp_path}, **RUN, outputs={"top_pictures": 3}
  )
  with pytest.raises(ConfigError, match=r"outputs\.top_pictures.*outputs\.maps"):
    score_job.validate(config)
  score_job.validate(
    job_config("score", "runlocal", data={"path": tmp_path}, **RUN, threshold={"method": "fixed"})
  )


def test_metrics_are_none_with_the_reason_for_one_class():
  one_class = engine._image_metrics(np.array([0.1, 0.2, 0.3]), np.array([0, 0, -1]))
  assert one_class["image_auroc"] is None and one_class["image_f1_max"] is None
  assert "anomalous" in one_class["undefined"]["image_auroc"] and one_class["labelled"] == 2
  both = engine._image_metrics(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 1]))
  assert both["image_auroc"] == 1.0 and both["image_f1_max"] == 1.0 and not both["undefined"]


@pytest.fixture(scope="module")
def labelled_run(folder_run, tmp_path_factory, job_config):
  """A labelled CSV manifest of the folder images: fixed threshold, float16 maps, 3 pictures."""
  images, single, _ = folder_run
  known = {r["file"]: float(r["score"]) for r in _rows(single)}
  tmp = tmp_path_factory.mktemp("bulk_labelled")
  manifest = tmp / "list.csv"
  names = sorted(known)
  labels = ["1" if i % 3 == 0 else "0" for i in range(len(names))]
  labels[-1] = ""  # Unknown: not counted by the metrics.
  lines = [f"{images / name},{label}" for name, label in zip(names, labels, strict=True)]
  manifest.write_text("path,label\n" + "\n".join(lines) + "\n")
  value = float(np.median(list(known.values())))
  fields = {
    "threshold.method": "fixed",
    "threshold.value": value,
    "outputs.maps": "float16",
    "outputs.top_pictures": 3,
  }
  config = job_config("score", "runlocal", data={"path": manifest}, **RUN, **fields)
  summary = score_job.run(config, tmp / "work")
  return tmp / "work", summary, known, value


def test_labelled_run_predicts_measures_and_draws_the_top_images(labelled_run, folder_run):
  workdir, summary, known, value = labelled_run
  rows = _rows(workdir)
  assert list(rows[0]) == ["file", "score", "label", "predicted_label"]
  scores = np.array([float(r["score"]) for r in rows])
  np.testing.assert_allclose(
    scores,
    [known[pathlib.Path(r["file"]).relative_to(folder_run[0]).as_posix()] for r in rows],
    rtol=1e-5,
  )
  assert [int(r["predicted_label"]) for r in rows] == [int(s >= value) for s in scores]
  assert summary["predicted_anomalous"] == int((scores >= value).sum())
  assert summary["threshold"] == {"method": "fixed", "value": value}
  labels = np.array([int(r["label"]) for r in rows])
  measured = summary["metrics"]
  assert measured["labelled"] == len(rows) - 1 and not measured["undefined"]
  assert measured["image_auroc"] == pytest.approx(metrics.image_auroc(scores, labels))
  assert measured["image_ap"] == pytest.approx(metrics.image_ap(scores, labels))
  assert measured["image_f1_max"] == pytest.approx(metrics.f1_max(scores, labels))
  for row in rows:  # float16 maps: the maximum within 1e-3 of the score.
    np.testing.assert_allclose(
      maps_store.load_map(workdir, row["file"]).max(), float(row["score"]), rtol=1e-3
    )
  top = sorted(rows, key=lambda r: -float(r["score"]))[:3]
  drawn = summary["pictures"]
  assert [p["file"] for p in drawn] == [r["file"] for r in top]
  assert [p["rank"] for p in drawn] == [1, 2, 3]
  for picture in drawn:
    path = pathlib.Path(picture["picture"])
    assert path.parent == workdir / "pictures" and path.name.startswith(f"{picture['rank']}_")
    assert Image.open(path).size == Image.open(picture["file"]).size
  assert sorted(p.name for p in (workdir / "pictures").iterdir()) == sorted(
    pathlib.Path(p["picture"]).name for p in drawn
  )


def test_scores_parquet_has_the_csv_rows(labelled_run):
  pq = pytest.importorskip("pyarrow.parquet")
  workdir, summary, _, _ = labelled_run
  table = pq.read_table(workdir / "scores.parquet").to_pydict()
  rows = _rows(workdir)
  assert list(table) == ["file", "score", "label", "predicted_label"]
  assert table["file"] == [r["file"] for r in rows]
  assert table["score"] == [float(r["score"]) for r in rows]
  assert table["label"] == [int(r["label"]) for r in rows]
  assert table["predicted_label"] == [int(r["predicted_label"]) for r in rows]
  assert summary["scores_parquet"] == str(workdir / "scores.parquet")

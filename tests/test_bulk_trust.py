"""Bulk scoring on inputs and models that cannot be trusted, and runs that overlap.

NaN or infinite maps and scores are never committed; a rerun refuses committed inputs
that changed; mask columns are refused; a run that scores nothing is an error; one file
under several spellings is scored once; names that are not UTF-8 or look like formulas
keep one form across the outputs; one run at a time per work directory; a killed merge's
temporary files are cleaned; and a soak test kills and resumes a run at random points.

Most runs use test-only detectors registered at run time (cheap maps of the pixels, some
of them NaN or infinite on bright images), not a model: what is tested is the job.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from maeday_jax import atomic_files
from maeday_jax.bulk import engine, lock, maps_store, reader, shards, source
from maeday_jax.checkpoints import CheckpointError
from maeday_jax.config_errors import ConfigError
from maeday_jax.data import DataError
from maeday_jax.detectors import registry
from maeday_jax.detectors.base import Detector
from maeday_jax.jobs import common
from maeday_jax.jobs import score as score_job
from tests import data_makers
from tests.bulk_kill import (
  COMMON_ARGS,
  blocking_copy,
  feed,
  kill_before_record,
  start_run,
  wait_for_parts,
)
from tests.conftest import REPO_ROOT
from tests.processes import run_processes

SIZE = 24  # The test detectors' input size.
RUN = {"data.num_workers": 2, "commit_every": 1, "compilation_cache_dir": ""}
NAMES = [f"img_{i:02d}.png" for i in range(20)]
BRIGHT = "img_11.png"  # All white: the NaN detectors' first (and only) bad image.
BAD_BYTES = b"bad\xff.png"  # Not valid UTF-8.
BAD_NAME = os.fsdecode(BAD_BYTES)  # As Python lists it: 'bad\udcff.png'.
BAD_TEXT = "bad\\xff.png"  # As the outputs write it.


class Energy(Detector):
  """Test-only: an image's map is its channel-summed squared (normalised) pixels."""

  method = "trust_energy"
  transductive = False

  @property
  def input_size(self) -> int:
    return SIZE

  def fit(self, normals, key) -> None:
    self.state = {}

  def score_function(self, mesh, local_batch):
    def score(state, images, ids, key):
      maps = self.maps(images)
      return maps, self.scores(images, maps)

    return score

  @staticmethod
  def maps(images):
    return jnp.sum(images**2, axis=-1)

  @staticmethod
  def scores(images, maps):
    return jnp.max(maps, axis=(1, 2))

  def record(self) -> dict:
    return {}

  def restore(self, record, state) -> None:
    self.state = state


def _bright(images):
  return (jnp.mean(images, axis=(1, 2, 3)) > 1.5)[:, None, None]


class NanWhenBright(Energy):
  """NaN maps (and so scores) for a bright image: a model that overflows on some inputs."""

  method = "trust_nan_bright"

  @staticmethod
  def maps(images):
    return jnp.where(_bright(images), jnp.nan, jnp.sum(images**2, axis=-1))


class InfMapFiniteScore(Energy):
  """An infinite map pixel on a bright image, yet finite scores (the mean pixel)."""

  method = "trust_inf_map"

  @staticmethod
  def maps(images):
    energy = jnp.sum(images**2, axis=-1)
    return energy.at[:, 0, 0].set(jnp.where(_bright(images)[:, 0, 0], jnp.inf, energy[:, 0, 0]))

  @staticmethod
  def scores(images, maps):
    return jnp.mean(images**2, axis=(1, 2, 3))


DETECTORS = (Energy, NanWhenBright, InfMapFiniteScore)


@pytest.fixture(scope="module", autouse=True)
def methods():
  for cls in DETECTORS:
    registry.register(cls.method, cls)
  yield
  for cls in DETECTORS:
    registry.unregister(cls.method)


def _config(job_config, path, detector=Energy.method, **fields):
  return job_config("score", "runlocal", data={"path": path}, detector=detector, **RUN, **fields)


def _rows(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "scores.csv", newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def _record(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / "shards/process_0/progress.json").read_text())


def _write_white(path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((30, 40, 3), 255, np.uint8)).save(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
  """20 images; `BRIGHT` all white."""
  folder = tmp_path_factory.mktemp("trust") / "images"
  for name in NAMES:
    if name == BRIGHT:
      _write_white(folder / name)
    else:
      data_makers.write_image(folder / name)
  return folder


def _copy(images, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(images, tmp_path / "images"))


# ---------------------------------------------------------------- 1. non-finite outputs


@pytest.mark.parametrize(
  "detector,maps",
  [(NanWhenBright, "none"), (InfMapFiniteScore, "none"), (InfMapFiniteScore, "float16")],
)
def test_non_finite_maps_or_scores_stop_the_run_before_their_batch_is_committed(
  images, tmp_path, job_config, detector, maps
):
  """The bright image is in the second batch of 8: the first is committed, nothing after."""
  workdir = tmp_path / "work"
  config = _config(job_config, images, detector.method, **{"outputs.maps": maps})
  for _ in range(2):  # The rerun resumes at the same batch and stops there again.
    with pytest.raises(
      CheckpointError, match=rf"^{detector.method} gives NaN or infinite .*{BRIGHT}"
    ):
      score_job.run(config, workdir)
    record = _record(workdir)
    assert record["parts"] == 1 and record["next_batch"] == 1 and record["images"] == 8
  part = shards.ShardStore(workdir, 0).part_rows(0)
  assert [r["file"] for r in part] == NAMES[:8]
  assert all(np.isfinite(float(r["score"])) for r in part)
  assert not (workdir / "scores.csv").exists() and not (workdir / "summary.json").exists()
  assert not list((workdir / "shards/process_0").glob("part_1*"))


def test_nan_weights_of_the_maeday_model_name_the_checkpoint(
  images, tmp_path, job_config, monkeypatch
):
  real = score_job.detector_choice.load

  def broken(config, spec, job):
    detector = real(config, spec, job)
    detector.state = jax.tree.map(
      lambda x: np.full(np.shape(x), np.nan, np.float32), detector.state
    )
    return detector

  monkeypatch.setattr(score_job.detector_choice, "load", broken)
  folder = tmp_path / "three"
  folder.mkdir()
  for name in NAMES[:3]:
    shutil.copy(images / name, folder / name)
  config = job_config("score", "runlocal", data={"path": folder}, **RUN)
  with pytest.raises(CheckpointError, match=r"^maeday \(random, 4 masks\) gives NaN .*img_00\.png"):
    score_job.run(config, tmp_path / "work")
  assert _record(tmp_path / "work")["parts"] == 0


def test_non_finite_threshold_is_refused_before_any_work(tmp_path, job_config):
  for value in (float("nan"), float("inf"), -float("inf")):
    config = _config(
      job_config, tmp_path, **{"threshold.method": "fixed", "threshold.value": value}
    )
    with pytest.raises(ConfigError, match=r"^--config\.threshold\.value: must be a finite number"):
      score_job.run(config, tmp_path / "work")
  config = _config(job_config, tmp_path, **{"threshold.value": float("nan")})  # method none
  with pytest.raises(ConfigError, match=r"threshold\.value"):
    score_job.validate(config)
  assert not (tmp_path / "work").exists()


def test_a_non_finite_score_is_never_written(images, tmp_path, job_config):
  store = shards.ShardStore(tmp_path / "store", 0)
  with pytest.raises(ValueError, match="non-finite score"):
    store.write_part(0, [(0, "a.png", "nan", "", "/a.png", 1, 1)])
  assert not store.folder.exists() or not list(store.folder.iterdir())
  workdir = tmp_path / "work"
  folder = _copy(images, tmp_path)
  (folder / BRIGHT).unlink()  # The energy detector is finite anyway.
  score_job.run(_config(job_config, folder), workdir)
  before = (workdir / "scores.csv").read_bytes()
  part = workdir / "shards/process_0/part_0.csv"
  rows = part.read_text().splitlines()
  cells = rows[1].split(",")
  cells[2] = "inf"  # A part of a broken model (an older version wrote them).
  part.write_text("\n".join([rows[0], ",".join(cells), *rows[2:]]) + "\n")
  with pytest.raises(CheckpointError, match=r"part_0\.csv: the committed score of .* is inf"):
    score_job.run(_config(job_config, folder), workdir)
  assert (workdir / "scores.csv").read_bytes() == before  # Not rewritten.


# ------------------------------------------------------------------- 2. changed inputs


def test_changed_inputs_are_refused_even_after_the_run_finished(images, tmp_path, job_config):
  folder = _copy(images, tmp_path)
  data_makers.write_truncated(folder / "zz_broken.png")  # Skipped: committed too.
  config, workdir = _config(job_config, folder), tmp_path / "work"
  first = score_job.run(config, workdir)
  assert first["images"] == 20 and first["skipped_count"] == 1
  stat = os.stat(folder / NAMES[3])
  os.utime(folder / NAMES[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touch
  data_makers.write_image(folder / NAMES[5], "gray", hw=(50, 60))  # Replaced, other size.
  data_makers.write_image(folder / "zz_broken.png")  # The skipped file fixed.
  with pytest.raises(ConfigError) as refused:
    score_job.run(config, workdir)
  message = str(refused.value)
  assert message.startswith(f"--config.data.path={folder}: 3 input(s) changed")
  assert f"{NAMES[3]} (modified since it was scored)" in message
  assert f"{NAMES[5]} (" in message and "bytes when scored" in message
  assert "zz_broken.png (" in message
  assert "--overwrite" in message and "new --workdir" in message
  assert _rows(workdir) and json.loads((workdir / "summary.json").read_text()) == first
  for name in NAMES[6:12]:  # More than the 5 named.
    data_makers.write_image(folder / name, "gray")
  with pytest.raises(ConfigError, match=r": 9 input\(s\) changed.*, and 4 more\. "):
    score_job.run(config, workdir)
  common.clear_workdir(workdir)  # --overwrite
  again = score_job.run(config, workdir)
  fresh = score_job.run(config, tmp_path / "fresh")
  assert again["images"] == 21 and _rows(workdir) == _rows(tmp_path / "fresh")
  assert fresh["images"] == 21


@pytest.mark.parametrize(
  ("name", "content", "reason"),
  [
    ("progress.json", b'{"process_index": 0, "trunc', "Unterminated string"),
    ("progress.json", b"[]", "a JSON list, not an object"),
    ("progress.json", None, "seconds is 'fast'"),  # Valid JSON, a field edited.
    ("part_0.csv", b"garbage\x00\xff\n1,2\n", "a row without index, file, score, label"),
    ("part_0.csv", b"index,file,score,label\nx,a.png,0.5,\n", "invalid literal for int()"),
    ("maps_0.npz", b"\x80\x04K\x01.", "not a maps archive"),  # A pickle: never loaded.
  ],
)
def test_damaged_committed_files_are_one_error_naming_the_file(
  images, tmp_path, job_config, name, content, reason
):
  """A record, part or maps file that was edited or damaged after a finished run: the
  rerun stops with one error naming the file and what to do, never a traceback."""
  config = _config(job_config, images, outputs={"maps": "uint8"})
  workdir = tmp_path / "work"
  score_job.run(config, workdir)
  path = workdir / "shards/process_0" / name
  if content is None:
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "seconds": "fast"}))
  else:
    path.write_bytes(content)
  with pytest.raises(ConfigError) as refused:
    score_job.run(config, workdir)
  message = str(refused.value)
  assert message.startswith(f"{path}: not what this job committed (") and reason in message
  assert "edited or damaged" in message and "move the work directory aside" in message


def test_manifest_labels_changed_mid_run(images, tmp_path, job_config, monkeypatch):
  """Committed rows keep their label or the rerun is refused; labels of rows not yet
  committed are read from the manifest as it is now: never a mix."""
  manifest = tmp_path / "list.csv"
  labels = {name: i % 2 for i, name in enumerate(NAMES) if name != BRIGHT}

  def write(changed: dict) -> None:
    rows = [f"{images / n},{changed.get(n, label)}" for n, label in labels.items()]
    manifest.write_text("path,label\n" + "\n".join(rows) + "\n")

  write({})
  config, workdir = _config(job_config, manifest), tmp_path / "work"
  kill_before_record(monkeypatch, 2, lambda: score_job.run(config, workdir))
  assert _record(workdir)["parts"] == 1  # The first 8 rows.
  write({NAMES[2]: 1 - labels[NAMES[2]]})
  with pytest.raises(ConfigError, match=rf"{NAMES[2]} \(label 0 when scored, 1 now\)"):
    score_job.run(config, workdir)
  late = NAMES[17]  # Not committed yet: its new label is the one used.
  write({late: 1 - labels[late]})
  summary = score_job.run(config, workdir)
  expected = {str(images / n): label for n, label in labels.items()}
  expected[str(images / late)] = 1 - labels[late]
  assert {r["file"]: int(r["label"]) for r in _rows(workdir)} == expected
  assert summary["metrics"]["labelled"] == len(labels)


# ----------------------------------------------------- 3, 4, 12. manifests: masks, nothing, BOM


def test_mask_column_with_files_is_refused(tmp_path):
  manifest = tmp_path / "list.csv"
  manifest.write_text("path,label,mask\na.png,0,\nb.png,1,masks/b.png\n")
  with pytest.raises(ConfigError) as refused:
    source.list_source(str(manifest))
  message = str(refused.value)
  assert "line 3 gives a mask (masks/b.png)" in message
  assert "bulk scoring does not use masks; use configs/evaluate.py for pixel metrics" in message
  assert "drop the 'mask' column" in message


def test_manifests_with_a_byte_order_mark_are_read(tmp_path):
  (tmp_path / "list.csv").write_text("path,label\na.png,1\nb.png,0\n", encoding="utf-8-sig")
  listed = source.list_source(str(tmp_path / "list.csv"))
  assert listed.files == ["a.png", "b.png"] and listed.labels == [1, 0]
  (tmp_path / "list.txt").write_text("a.png\n# note\nb.png\n", encoding="utf-8-sig")
  assert source.list_source(str(tmp_path / "list.txt")).files == ["a.png", "b.png"]


def test_nothing_scored_is_an_error_naming_the_first_path(tmp_path, job_config):
  folder = tmp_path / "lists"
  folder.mkdir()
  (folder / "list.txt").write_text("photos/a.png\nphotos/b.png\n")
  config, workdir = _config(job_config, folder / "list.txt"), tmp_path / "work"
  with pytest.raises(DataError) as refused:
    score_job.run(config, workdir)
  message = str(refused.value)
  assert "no image could be scored: all 2 listed file(s) were skipped" in message
  assert f"The first: photos/a.png, looked up as {folder / 'photos/a.png'}" in message
  assert f"resolved against its folder, {folder})" in message
  assert "No such file" in message
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["images"] == 0 and summary["skipped_count"] == 2


# -------------------------------------------------- 6, 7. one file once; names in outputs


def test_one_file_under_several_spellings_is_scored_once(images, tmp_path, job_config):
  folder = tmp_path / "data"
  (folder / "a").mkdir(parents=True)
  shutil.copy(images / NAMES[0], folder / "a/x.png")
  shutil.copy(images / NAMES[1], folder / "b.png")
  os.symlink("x.png", folder / "a/link.png")
  manifest = folder / "list.txt"
  manifest.write_text("a/x.png\na//x.png\nb.png\na/./x.png\na/link.png\nb.png\n")
  listed = source.list_source(str(manifest))
  assert listed.files == ["a/./x.png", "b.png"] and listed.duplicates == 4
  assert set(listed.duplicate_examples) == {
    ("a//x.png", "a/./x.png"),
    ("a/link.png", "a/./x.png"),
    ("a/x.png", "a/./x.png"),
    ("b.png", "b.png"),
  }
  summary = score_job.run(_config(job_config, manifest), tmp_path / "work")
  assert [r["file"] for r in _rows(tmp_path / "work")] == ["a/./x.png", "b.png"]
  assert summary["images"] == 2 and summary["duplicates"] == 4
  assert {"file": "a/link.png", "same_as": "a/./x.png"} in summary["duplicate_examples"]
  # In a folder, a link to a file of the folder is that file.
  assert source.list_source(str(folder / "a")).files == ["link.png"]
  labelled = folder / "list.csv"
  labelled.write_text("path,label\na/x.png,0\na/link.png,1\n")
  with pytest.raises(ConfigError, match=r"lists one file twice with different labels"):
    source.list_source(str(labelled))


@pytest.fixture(scope="module")
def odd_names(images, tmp_path_factory) -> pathlib.Path:
  """Names with spaces, accents, a formula start, a quote, and bytes that are not UTF-8."""
  folder = tmp_path_factory.mktemp("odd") / "images"
  folder.mkdir()
  odd = ["with space.png", "ünïcödé.png", "=cmd.png", "'=quoted.png", "-minus.png"]
  for i, name in enumerate(odd + NAMES[:12]):
    shutil.copy(images / NAMES[(i + 13) % 20 if i < len(odd) else i - len(odd)], folder / name)
  shutil.copy(images / NAMES[19], os.path.join(os.fsencode(folder), BAD_BYTES))
  return folder


def test_odd_names_keep_one_form_across_the_outputs(odd_names, tmp_path, job_config):
  pq = pytest.importorskip("pyarrow.parquet")
  workdir = tmp_path / "work"
  config = _config(job_config, odd_names, **{"outputs.maps": "float16", "outputs.top_pictures": 2})
  summary = score_job.run(config, workdir)
  listed = source.list_source(str(odd_names)).files
  assert BAD_NAME in listed and summary["images"] == len(listed) == 18
  names = [source.output_name(n) for n in listed]
  assert BAD_TEXT in names and "=cmd.png" in names
  csv_names = [r["file"] for r in _rows(workdir)]
  quoted = {"=cmd.png": "'=cmd.png", "-minus.png": "'-minus.png"}
  assert csv_names == [quoted.get(n, n) for n in names]  # The quote: scores.csv only.
  assert pq.read_table(workdir / "scores.parquet").column("file").to_pylist() == names
  with open(workdir / "maps_index.csv", newline="", encoding="utf-8") as f:
    assert [e["file"] for e in csv.DictReader(f)] == names
  for name in (BAD_NAME, BAD_TEXT, "=cmd.png", "'=quoted.png"):
    assert maps_store.load_map(workdir, name).shape == (SIZE, SIZE)
  # summary.json is strict UTF-8 JSON (no lone surrogates).
  text = (workdir / "summary.json").read_bytes().decode("utf-8")
  assert "\\udc" not in text and BAD_NAME not in text
  score_job.run(config, workdir)  # A rerun (finished): no UnicodeEncodeError either.
  # A manifest may list the name too (as bytes, the way `ls > list.txt` writes it).
  manifest = tmp_path / "list.txt"
  manifest.write_bytes(os.path.join(os.fsencode(odd_names), BAD_BYTES) + b"\n")
  assert source.list_source(str(manifest)).paths == [os.path.join(str(odd_names), BAD_NAME)]


# --------------------------------------------------------------- 8, 13. lock, temporaries


def test_a_locked_workdir_is_refused_and_a_stale_lock_taken_over(
  images, tmp_path, job_config, caplog
):
  workdir = tmp_path / "work"
  config = _config(job_config, images)
  score_job.run(config, workdir)
  shard = workdir / "shards/process_0"
  before = {p.name: p.stat().st_mtime_ns for p in shard.iterdir()}
  fd, error = lock.acquire(workdir / ".lock")  # Another run holds it (this process).
  assert fd is not None and not error
  try:
    with pytest.raises(lock.WorkdirLocked) as refused:
      score_job.run(config, workdir)
  finally:
    lock.release(fd)
  message = str(refused.value)
  assert message.startswith(f"--workdir {workdir} is in use by another bulk run: host ")
  assert f", pid {os.getpid()}, started " in message and "another --workdir" in message
  assert {p.name: p.stat().st_mtime_ns for p in shard.iterdir()} == before  # Untouched.
  # A lock file a killed run left (no one holds the flock): taken over, and logged.
  (workdir / ".lock").write_text(json.dumps({"host": "oldhost", "pid": 999999}))
  caplog.set_level(logging.INFO, logger="maeday_jax")
  score_job.run(config, workdir)
  assert "Took over the lock" in caplog.text and "host oldhost, pid 999999" in caplog.text
  assert (workdir / ".lock").read_text() == ""  # Emptied at the end.


def test_a_second_run_is_refused_and_ctrl_c_says_what_is_kept(images, tmp_path):
  """Two commands (the runlocal MAEDAY: a command cannot use this file's detectors): the
  first waits on a named pipe after its first commit; the second, on the same work
  directory, stops with one error line naming the first's pid. Ctrl-C then stops the
  first, which says what it keeps."""
  names = [n for n in NAMES if n != BRIGHT]
  # In the third batch of 8: a batch is committed once the next one is read, so the run
  # waits there with the first committed.
  blocked = names[18]
  reference = _copy(images, tmp_path)
  killed = blocking_copy(reference, tmp_path / "killed", names, [blocked])
  workdir, manifest = tmp_path / "work", killed / "list.txt"
  first = start_run(workdir, manifest, tmp_path / "first.log")
  try:
    wait_for_parts(first, workdir, tmp_path / "first.log", 1)
    second = subprocess.run(
      [
        *(sys.executable, "-m", "maeday_jax.main", "--config", "configs/score.py:runlocal"),
        *("--workdir", str(workdir), f"--config.data.path={manifest}", *COMMON_ARGS),
      ],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=240,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert "is in use by another bulk run: host " in errors[0]
    assert f", pid {first.pid}, " in errors[0]
    first.send_signal(signal.SIGINT)
    feed(killed, reference, blocked)  # The blocked read returns; the run sees the Ctrl-C.
    assert first.wait(timeout=120) == 130
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  log = (tmp_path / "first.log").read_text()
  assert "Interrupted. Every batch committed so far is kept in" in log
  assert "run the same command again to resume" in log and "metrics.json" not in log
  assert "Traceback" not in log
  assert "metrics.json" not in score_job.interrupted_message(workdir)
  assert _record(workdir)["parts"] >= 1  # Kept for the rerun.


def test_a_killed_merge_leaves_no_temporary_files(images, tmp_path, job_config):
  folder = _copy(images, tmp_path)
  workdir = tmp_path / "work"
  config = _config(job_config, folder, **{"outputs.maps": "uint8", "outputs.top_pictures": 2})
  score_job.run(config, workdir)
  # What a kill -9 during the merge leaves (replace_when_done's temporary names).
  stale = [
    atomic_files.temporary_path(workdir / name)
    for name in ("scores.csv", "scores.parquet", "maps_index.csv", "summary.json")
  ]
  stale.append(atomic_files.temporary_path(workdir / "pictures/1_img_00.png"))
  stale.append(atomic_files.temporary_path(workdir / "shards/process_0/part_1.csv"))
  for path in stale:
    path.write_text("half")
  (workdir / ".keep.tmp").write_text("not ours")  # Not a temporary name: left alone.
  score_job.run(config, workdir)
  assert not [p for p in stale if p.exists()]
  assert (workdir / ".keep.tmp").exists()
  leftovers = [p for p in workdir.rglob("*") if atomic_files.TEMPORARY_MARKER in p.name]
  assert not leftovers


# -------------------------------------------------------------------------- soak


ROUNDS = 20  # Soak rounds: each from an empty work directory, killed until it finishes.


class RandomKill:
  """Raises KeyboardInterrupt at the `at`-th call of the instrumented function `target`:
  a kill at a point a seeded RNG chose (between commits, inside an atomic write, in a
  read, before the merge). With no target it only counts every function's calls."""

  TARGETS = (
    (shards.ShardStore, "write_part"),
    (shards.ShardStore, "write"),
    (maps_store, "write_shard"),
    (atomic_files, "_fsync_file"),
    (reader, "_load"),
    (engine, "merge"),
  )

  def __init__(self, monkeypatch, target: str = "", at: int = 0):
    self.calls: dict[str, int] = {}
    self.target, self.at = target, at
    for owner, name in self.TARGETS:
      monkeypatch.setattr(owner, name, self.wrap(getattr(owner, name), name))

  def wrap(self, real, name):
    def killed(*args, **kwargs):
      self.calls[name] = self.calls.get(name, 0) + 1
      if name == self.target and self.calls[name] == self.at:
        raise KeyboardInterrupt(f"simulated kill in {name}")
      return real(*args, **kwargs)

    return killed


def _kill_until_done(config, workdir, rng, monkeypatch, calls: dict) -> list[tuple]:
  """Runs `config` on `workdir` until a run finishes, each killed at a random call of a
  random function among those an uninterrupted run makes (`calls`: how many of each; a
  resumed run makes fewer, so it may finish); returns the kill points. After a kill,
  sometimes leaves the temporary files a SIGKILL would."""
  kills = []
  while True:
    assert len(kills) < 50, kills
    target = rng.choice(sorted(calls))
    at = rng.randint(1, calls[target])
    with monkeypatch.context() as patch:
      RandomKill(patch, target, at)
      try:
        score_job.run(config, workdir)
        return kills
      except KeyboardInterrupt:
        kills.append((target, at))
    if rng.random() < 0.5:
      for path in (workdir / "scores.csv", workdir / "shards/process_0/part_9.csv"):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_files.temporary_path(path).write_text("half")


def _outputs(workdir) -> tuple:
  workdir = pathlib.Path(workdir)
  summary = json.loads((workdir / "summary.json").read_text())
  kept = {k: summary[k] for k in ("images", "listed", "skipped", "duplicates")}
  return (workdir / "scores.csv").read_bytes(), (workdir / "maps_index.csv").read_bytes(), kept


def test_soak_random_kills_and_a_changed_input_end_as_an_uninterrupted_run(
  odd_names, tmp_path, job_config, monkeypatch
):
  rng = random.Random(20240607)
  folder = pathlib.Path(shutil.copytree(odd_names, tmp_path / "images", symlinks=True))
  for i in range(30):  # 49 files: 7 batches of 8, one truncated.
    data_makers.write_image(folder / f"more/{i:02d}.png", "rgb" if i % 2 else "gray")
  data_makers.write_truncated(folder / "zz_truncated.png")
  config = _config(job_config, folder, **{"outputs.maps": "uint8"})
  with monkeypatch.context() as patch:  # Counts the calls an uninterrupted run makes.
    counter = RandomKill(patch)
    score_job.run(config, tmp_path / "reference")
  workdir = tmp_path / "work"
  kills = []
  for _ in range(ROUNDS):
    common.clear_workdir(workdir)  # --overwrite
    kills += _kill_until_done(config, workdir, rng, monkeypatch, counter.calls)
    assert _outputs(workdir) == _outputs(tmp_path / "reference")
  assert len(kills) >= ROUNDS and len({target for target, _ in kills}) == len(counter.calls)
  # An input replaced after it was scored: refused, then --overwrite and the same soak.
  data_makers.write_image(folder / "ünïcödé.png", "gray", hw=(20, 20))
  with pytest.raises(ConfigError, match="ünïcödé.png"):
    score_job.run(config, workdir)
  common.clear_workdir(workdir)
  _kill_until_done(config, workdir, rng, monkeypatch, counter.calls)
  score_job.run(config, tmp_path / "reference_changed")
  assert _outputs(workdir) == _outputs(tmp_path / "reference_changed")
  assert _outputs(workdir) != _outputs(tmp_path / "reference")
  assert not [p for p in workdir.rglob("*") if atomic_files.TEMPORARY_MARKER in p.name]


# ------------------------------------------------------------------ two processes

# One process of a two-process run with 4 simulated CPU devices each: a NaN model whose
# first bad image is in process 1's shard, then a finished run whose input (in process
# 1's shard) is touched before a rerun. Each expected error is written to a file.
TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax

port, pid, images, tmp = sys.argv[1:5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
from jax.experimental import multihost_utils
from maeday_jax.checkpoints import CheckpointError
from maeday_jax.config_errors import ConfigError
from maeday_jax.detectors import registry
from maeday_jax.jobs import score
from tests.conftest import make_job_config
from tests.test_bulk_trust import NAMES, RUN, Energy, NanWhenBright

for cls in (Energy, NanWhenBright):
  registry.register(cls.method, cls)


def run(method, workdir, error, name):
  config = make_job_config("score", "runlocal", data={"path": images}, detector=method, **RUN)
  try:
    score.run(config, workdir)
  except error as e:
    with open(f"{tmp}/{name}_{pid}.txt", "w") as f:
      f.write(str(e))


run(NanWhenBright.method, f"{tmp}/nan", CheckpointError, "nan")
score.run(
  make_job_config("score", "runlocal", data={"path": images}, detector=Energy.method, **RUN),
  f"{tmp}/energy",
)
multihost_utils.sync_global_devices("scored")
if pid == "0":
  path = os.path.join(images, NAMES[15])
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
multihost_utils.sync_global_devices("touched")
run(Energy.method, f"{tmp}/energy", ConfigError, "changed")
"""


def test_two_processes_stop_together_on_non_finite_scores_and_changed_inputs(images, tmp_path):
  """Only process 1 sees the bad image and the changed file; both stop with its error,
  at the same point (no process waits for the other in a collective)."""
  folder = _copy(images, tmp_path)
  run_processes(TWO_PROCESS_WORKER, str(folder), str(tmp_path))
  for name, pattern in (
    ("nan", rf"^{NanWhenBright.method} gives NaN .*{BRIGHT}"),
    ("changed", rf": 1 input\(s\) changed .*{NAMES[15]} \(modified"),
  ):
    messages = [(tmp_path / f"{name}_{pid}.txt").read_text() for pid in (0, 1)]
    assert messages[0] == messages[1]
    assert re.search(pattern, messages[0]), messages[0]
  for pid in (0, 1):  # BRIGHT is in process 1's first batch: nothing committed anywhere.
    record = json.loads((tmp_path / f"nan/shards/process_{pid}/progress.json").read_text())
    assert record["parts"] == 0 and record["next_batch"] == 0


def test_overwrite_never_clears_a_workdir_a_run_is_using(tmp_path):
  """`--overwrite` (`common.clear_workdir`) takes the run's lock first: while another run
  holds it, nothing is deleted; once released, the folder is cleared."""
  from maeday_jax.jobs import common

  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}")
  (workdir / "scores.csv").write_text("file,score\n")
  fd, error = lock.acquire(workdir / lock.LOCK_FILE)
  assert not error
  try:
    with pytest.raises(lock.WorkdirLocked, match="--overwrite: --workdir .* is in use"):
      common.clear_workdir(workdir)
    assert (workdir / "scores.csv").is_file()
  finally:
    lock.release(fd)
  common.clear_workdir(workdir)
  assert list(workdir.iterdir()) == []

"""Killing the bulk job at a known point: named pipes in place of images, then SIGKILL.

    killed = blocking_copy(reference, tmp_path / "killed", names, blocked=[names[18]])
    record = run_and_kill(workdir, killed / "list.txt", log, parts=1, "--config.detector=...")
    unblock(killed, reference, names[18])

`start_run` and `wait_for_parts` run one without killing it (a second run beside it, a
Ctrl-C); `feed` then hands the blocked read its file through the pipe.

Reading a named pipe blocks until the test replaces it with the real file, so a run that
reaches a pipe's batch waits there, after committing the batches before it (the engine
commits a batch once the next one is on its way): the kill then lands between commits,
the way a pre-emption would, and never while a part is half written.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT

# The settings every killed run shares: a commit after every batch, no compilation cache
# (the in-process reruns leave the test process's JAX settings alone), 2 decoding threads.
COMMON_ARGS = (
  "--config.commit_every=1",
  "--config.compilation_cache_dir=",
  "--config.data.num_workers=2",
)


def blocking_copy(reference, folder, names, blocked) -> pathlib.Path:
  """Copies `reference` to `folder` with the files `blocked` replaced by named pipes, and
  writes `list.txt` (the manifest of `names`, in order) into both folders."""
  reference, folder = pathlib.Path(reference), pathlib.Path(folder)
  shutil.copytree(reference, folder)
  for name in blocked:
    (folder / name).unlink()
    os.mkfifo(folder / name)
  for root in (reference, folder):
    (root / "list.txt").write_text("\n".join(names))
  return folder


def start_run(workdir, manifest, log_path, *args: str) -> subprocess.Popen:
  """Starts `configs/score.py:runlocal` as a command on `manifest` (with `COMMON_ARGS` and
  the further command-line `args`), its output to `log_path`."""
  command = [
    *(sys.executable, "-m", "maeday_jax.main", "--config", "configs/score.py:runlocal"),
    *("--workdir", str(workdir), f"--config.data.path={manifest}", *COMMON_ARGS, *args),
  ]
  with open(log_path, "w") as log:
    # Ctrl-C reaches the run however pytest was started: a shell starts background jobs
    # with SIGINT ignored, and Python keeps an ignored SIGINT ignored.
    return subprocess.Popen(
      command,
      cwd=REPO_ROOT,
      stdout=log,
      stderr=log,
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def committed_parts(workdir) -> int:
  """The parts process 0's record counts (0 before it has one)."""
  try:
    record = pathlib.Path(workdir) / "shards/process_0/progress.json"
    return json.loads(record.read_text())["parts"]
  except (OSError, ValueError, KeyError):
    return 0


def wait_for_parts(proc, workdir, log_path, parts: int, timeout=240.0) -> None:
  """Waits until the run `proc` has committed `parts` parts (it must not end before)."""
  deadline = time.monotonic() + timeout
  while committed_parts(workdir) < parts:
    assert proc.poll() is None, pathlib.Path(log_path).read_text()[-3000:]
    assert time.monotonic() < deadline, f"no commit {parts} within {timeout} s"
    time.sleep(0.05)


def run_and_kill(workdir, manifest, log_path, parts: int, *args: str, timeout=240.0) -> dict:
  """Runs `configs/score.py:runlocal` as a command on `manifest` (`start_run`), SIGKILLs
  it once `parts` parts are committed, and returns its progress record (process 0)."""
  workdir, log_path = pathlib.Path(workdir), pathlib.Path(log_path)
  proc = start_run(workdir, manifest, log_path, *args)
  try:
    wait_for_parts(proc, workdir, log_path, parts, timeout)
    time.sleep(0.5)  # A run that does not block as planned would commit more here.
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  return json.loads((workdir / "shards/process_0/progress.json").read_text())


def feed(killed, reference, name, timeout=30.0) -> None:
  """Writes the real file into the named pipe `name` of `killed` once its reader has it
  open: the read that blocks a run returns (use `unblock` for the runs after)."""
  fifo = pathlib.Path(killed) / name
  deadline = time.monotonic() + timeout
  while True:
    try:
      fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no one reads.
      break
    except OSError:
      assert time.monotonic() < deadline, f"no reader opened {fifo} within {timeout} s"
      time.sleep(0.05)
  os.set_blocking(fd, True)
  with os.fdopen(fd, "wb") as f:
    f.write((pathlib.Path(reference) / name).read_bytes())


def unblock(killed, reference, name) -> None:
  """Replaces the named pipe `name` of `killed` with the real file of `reference`."""
  (pathlib.Path(killed) / name).unlink()
  shutil.copy(pathlib.Path(reference) / name, pathlib.Path(killed) / name)


def kill_before_record(monkeypatch, parts: int, run) -> None:
  """Calls `run()` with the progress record that would count part `parts` raising
  KeyboardInterrupt (a kill after that part is written, before its record), then restores
  the record writer."""
  import pytest

  from maeday_jax.bulk import shards

  real = shards.ShardStore.write

  def killed(self, progress):
    if progress.parts == parts:
      raise KeyboardInterrupt("simulated kill")
    real(self, progress)

  monkeypatch.setattr(shards.ShardStore, "write", killed)
  with pytest.raises(KeyboardInterrupt):
    run()
  monkeypatch.setattr(shards.ShardStore, "write", real)

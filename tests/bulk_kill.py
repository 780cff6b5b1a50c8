"""Killing the bulk job at a known point: named pipes in place of images, then SIGKILL.

    killed = blocking_copy(reference, tmp_path / "killed", names, blocked=[names[18]])
    record = run_and_kill(workdir, killed / "list.txt", log, parts=1, "--config.detector=...")
    unblock(killed, reference, names[18])

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


def run_and_kill(workdir, manifest, log_path, parts: int, *args: str, timeout=240.0) -> dict:
  """Runs `configs/score.py:runlocal` as a command on `manifest` (with `COMMON_ARGS` and
  the further command-line `args`), SIGKILLs it once `parts` parts are committed, and
  returns its progress record (process 0)."""
  workdir, log_path = pathlib.Path(workdir), pathlib.Path(log_path)
  command = [
    *(sys.executable, "-m", "maeday_jax.main", "--config", "configs/score.py:runlocal"),
    *("--workdir", str(workdir), f"--config.data.path={manifest}", *COMMON_ARGS, *args),
  ]
  with open(log_path, "w") as log:
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=log)
  shard = workdir / "shards/process_0"

  def committed() -> int:
    try:
      return json.loads((shard / "progress.json").read_text())["parts"]
    except (OSError, ValueError, KeyError):
      return 0

  try:
    deadline = time.monotonic() + timeout
    while committed() < parts:
      assert proc.poll() is None, log_path.read_text()[-3000:]
      assert time.monotonic() < deadline, f"no commit {parts} within {timeout} s"
      time.sleep(0.05)
    time.sleep(0.5)  # A run that does not block as planned would commit more here.
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  return json.loads((shard / "progress.json").read_text())


def unblock(killed, reference, name) -> None:
  """Replaces the named pipe `name` of `killed` with the real file of `reference`."""
  (pathlib.Path(killed) / name).unlink()
  shutil.copy(pathlib.Path(reference) / name, pathlib.Path(killed) / name)

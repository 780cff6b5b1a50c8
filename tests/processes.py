"""Runs a script as several JAX processes on this machine (`jax.distributed`, gloo on CPU).

`start_processes` needs neither pytest nor this test suite's set-up: the bulk benchmark
(tools/benchmarks/benchmark_bulk.py) starts its jobs with it too.
"""

import os
import pathlib
import socket
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(script: str, *args: str, num_processes: int = 2) -> list[subprocess.Popen]:
  """Starts `python -c script PORT PROCESS_ID *args` once per process, side by side, in
  the repository root (importable there: `maeday_jax`, `configs`, `tests`).

  Each process has one CPU device and finds the others through 127.0.0.1:PORT (the script
  calls `jax.distributed.initialize`); its stdout and stderr are one text pipe.
  """
  port = str(_free_port())
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO_ROOT)}
  return [
    subprocess.Popen(
      [sys.executable, "-c", script, port, str(pid), *args],
      env=env,
      cwd=REPO_ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in range(num_processes)
  ]


def run_processes(script: str, *args: str, num_processes: int = 2, timeout: float = 300) -> None:
  """Runs `start_processes(script, *args)` to the end.

  Fails the test, with the end of the output, when a process fails or they do not all
  finish within `timeout` seconds.
  """
  import pytest

  procs = start_processes(script, *args, num_processes=num_processes)
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail(f"The {num_processes}-process run did not finish in {timeout} s.")
  finally:
    for p in procs:
      p.kill()
  for pid, (p, output) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {pid}:\n{output[-3000:]}"

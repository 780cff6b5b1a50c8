"""`tools/benchmark.py --task musc` runs and reports (tiny DINOv2)."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def _run(*args) -> list[dict]:
  result = subprocess.run(
    [
      sys.executable,
      "tools/benchmark.py",
      *args,
      "--backbone",
      "dinov2_test",
      "--image-size",
      "56",
      "--steps",
      "1",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_musc_task_reports_speed_and_memory():
  rows = _run("--task=musc", "--groups", "8,16")
  assert [r["group"] for r in rows] == [8, 16] and all(r["step_seconds"] > 0 for r in rows)
  assert all(r["host_peak_rss_mib"] > 0 and r["images_per_second"] > 0 for r in rows)

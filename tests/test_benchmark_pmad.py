"""`tools/benchmark.py --task pmad` runs and reports (the tiny smoke shape)."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_pmad_task_reports_training_and_scoring_cost(tmp_path):
  out = tmp_path / "pmad.json"
  result = subprocess.run(
    [
      sys.executable,
      "tools/benchmark.py",
      "--task",
      "pmad",
      "--variant",
      "test",
      "--image-size",
      "32",
      "--batch",
      "8",
      "--steps",
      "1",
      "--warmup",
      "0",
      "--json",
      str(out),
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--task pmad" in result.stdout and "load average" in result.stdout
  figures = json.loads(out.read_text())
  training, scoring = figures["rows"]
  assert training["phase"] == "training" and scoring["phase"] == "scoring"
  for row in (training, scoring):
    assert row["batch"] == 8 and len(row["step_times_s"]) == 1
    assert row["compile_seconds"] > 0 and row["images_per_second"] > 0
    assert row["host_peak_rss_mib"] > 0
  assert training["target"] == "codebook" and training["out_dim"] == 16
  assert scoring["prototypes"] == 16 * 16 // 10 and scoring["scores_finite"]
  assert figures["machine"]["cpu_count"] >= 1


def test_pmad_task_wants_a_tokenizer_for_dvae_targets():
  result = subprocess.run(
    [sys.executable, "tools/benchmark.py", "--task=pmad", "--target", "dvae"],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2 and "--tokenizer PATH" in result.stderr

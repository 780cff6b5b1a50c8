"""`tools/benchmark.py` runs both tasks end to end on the JAX side (PyTorch is optional).

Only that the tool works and its figures are consistent is tested here; the timings
themselves are what the tool is for, and are never asserted.
"""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import benchmark  # noqa: E402
import benchmark_finetune  # noqa: E402


def _run(tmp_path, *argv) -> dict:
  out = tmp_path / "bench.json"
  assert benchmark.main([*argv, "--arch", "test", "--no-torch", "--json", str(out)]) == 0
  return json.loads(out.read_text())


def test_finetune_task(tmp_path, capsys):
  result = _run(
    tmp_path, "--task", "finetune", "--batch", "8", "--steps", "2", "--warmup", "0",
    "--shots", "2", "--rank", "4",
  )  # fmt: skip
  jx = result["jax"]
  # The tool's own count of LoRA parameters (from the architecture table) equals the
  # library's (from the parameter tree it trained).
  arch = benchmark.ARCHS["test"]
  assert jx["lora_parameters"] == benchmark_finetune.lora_parameter_count(arch, 4)
  assert result["work"]["lora_parameters"] == jx["lora_parameters"]
  # Two SGD updates on one fixed batch lower its loss.
  before, after_one, after_two = jx["check_losses"]
  assert after_two < after_one < before
  assert len(jx["step_times_s"]) == 2 and jx["lora_compute"] == "activations"
  report = capsys.readouterr().out
  assert "50-iteration fine-tune:" in report and "LoRA rank 4 on 15 matrices" in report


def test_zero_shot_task(tmp_path):
  result = _run(tmp_path, "--batch", "8", "--num-masks", "2", "--steps", "1", "--warmup", "0")
  scores = result["jax"]["scores"]
  assert len(scores) == 8 and all(s > 0 for s in scores)
  assert result["work"]["per_image"] == 2 * result["work"]["per_mask"]["total"]


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--task", "finetune", "--rank", "0"])

"""`tools/benchmark.py` runs every task end to end on the JAX side (PyTorch is optional).

Only that the tool works and its figures are consistent is tested here; the timings
themselves are what the tool is for, and are never asserted.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
# The entry point, and the task modules beside it (it puts their folder on the path too).
sys.path[:0] = [str(TOOLS), str(TOOLS / "benchmarks")]
import benchmark  # noqa: E402
import benchmark_anomalydino  # noqa: E402
import benchmark_finetune  # noqa: E402
import benchmark_patchcore  # noqa: E402

# The PyTorch side of the PatchCore test (plain torch suffices); skipped where absent.
TORCH_PYTHON = os.environ.get("MAEDAY_TORCH_PYTHON", "/work/venv-torch/bin/python")


def _run(tmp_path, *argv, arch="test", torch=("--no-torch",)) -> dict:
  out = tmp_path / "bench.json"
  assert benchmark.main([*argv, "--arch", arch, *torch, "--json", str(out)]) == 0
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


PATCHCORE_ARGS = ("--task", "patchcore", "--batch", "8", "--steps", "1", "--warmup", "0")


def test_patchcore_task(tmp_path, capsys):
  result = _run(tmp_path, *PATCHCORE_ARGS, arch="test_wide")
  jx, work = result["jax"], result["work"]
  # test_wide: layer2 (32 channels) + layer3 (64) on a 28 x 28 grid at 224 px; one shot
  # at coreset ratio 0.1 keeps int(784 * 0.1) rows, the check bank all 784.
  assert work["embedding_dim"] == 96 and work["bank_rows"] == 78
  assert jx["bank_shape"] == [78, 96] and jx["check_bank_shape"] == [784, 96]
  assert len(jx["scores"]) == 8 and all(s > 0 for s in jx["check_scores"])
  assert jx["fit_median_s"] > 0 and jx["peak_rss_bytes"] > 0
  report = capsys.readouterr().out
  assert "bank 78 x 96" in report and "backbone test_wide" in report


def _plain_sides_agree(tmp_path, args, arch: str, model_flag: str) -> tuple[dict, dict]:
  """A memory-bank task against its plain-PyTorch side, interleaved: the same inputs, bank
  shapes and check scores (to 1e-4); (JAX, PyTorch) results."""
  torch = ("--interleave", "--torch-python", TORCH_PYTHON, model_flag, "plain")
  result = _run(tmp_path, *args, arch=arch, torch=torch)
  jx, pt = result["jax"], result["pytorch"]
  assert result["same_inputs"] and pt["implementation"].startswith("plain PyTorch")
  assert pt["bank_shape"] == jx["bank_shape"] and pt["check_bank_shape"] == jx["check_bank_shape"]
  assert result["score_max_rel_diff"] < 1e-4
  return jx, pt


@pytest.mark.skipif(not os.access(TORCH_PYTHON, os.X_OK), reason=f"no {TORCH_PYTHON}")
def test_patchcore_sides_agree(tmp_path):
  # The flag's old name, kept as an alias.
  _plain_sides_agree(tmp_path, PATCHCORE_ARGS, "test_wide", "--torch-patchcore")


# The tiny DINOv2 at 112 px: 8 x 8 patches; the check at its training size, 56 px (4 x 4).
ANOMALYDINO_ARGS = (
  "--task", "anomalydino", "--batch", "8", "--image-size", "112", "--shots", "2",
  "--steps", "1", "--warmup", "0",
)  # fmt: skip


def test_anomalydino_task(tmp_path, capsys):
  result = _run(tmp_path, *ANOMALYDINO_ARGS, arch="dinov2_test")
  jx, work = result["jax"], result["work"]
  # 2 shots x 4 rotations x 64 patches of 48-D; the check's bank 2 x 4 x 16.
  assert work["bank_rows"] == 512 and work["patches_per_image"] == 64
  assert jx["bank_shape"] == [512, 48] and jx["check_bank_shape"] == [128, 48]
  assert len(jx["scores"]) == 8 and len(jx["check_scores"]) == benchmark_anomalydino.CHECK_IMAGES
  # Cosine distances of unit vectors: in [0, 2], and above 0 for unseen random images.
  assert all(0 < s <= 2 for s in jx["scores"] + jx["check_scores"])
  assert jx["fit_median_s"] > 0 and jx["dtype"] == "float32"
  report = capsys.readouterr().out
  assert "bank 512 x 48" in report and "backbone dinov2_test: 48-D, 3 blocks" in report


@pytest.mark.skipif(not os.access(TORCH_PYTHON, os.X_OK), reason=f"no {TORCH_PYTHON}")
def test_anomalydino_sides_agree(tmp_path):
  """The library's detector against anomalib's computation on the independent PyTorch
  DINOv2: the same bank shapes and image scores, at 112 px (positions resized) as well."""
  jx, pt = _plain_sides_agree(tmp_path, ANOMALYDINO_ARGS, "dinov2_test", "--torch-model")
  np.testing.assert_allclose(jx["scores"], pt["scores"], rtol=1e-4)


def test_anomalydino_flop_count():
  # The DeiT paper's count for DeiT-S (ViT-S/16, 224 px, 196 patches): 4.6 G
  # multiply-adds (fvcore's "FLOPs"), attention products included.
  arch = dict(benchmark.DINO_ARCHS["dinov2_vits14"], patch_size=16)
  assert benchmark_anomalydino.backbone_flops(arch, 224) / 2e9 == pytest.approx(4.6, rel=0.01)


def test_patchcore_flop_count():
  # torchvision's published multiply-adds of the whole networks: 11.4 G and 1.81 G.
  for name, gmacs in (("wide_resnet50_2", 11.4), ("resnet18", 1.81)):
    arch = benchmark.RESNET_ARCHS[name]
    count = benchmark_patchcore.backbone_flops(arch, last_layer=4) / 2e9
    assert count == pytest.approx(gmacs, rel=5e-3)


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--task", "finetune", "--rank", "0"])
  with pytest.raises(SystemExit):  # an MAE for PatchCore
    benchmark.parse_args(["--task", "patchcore", "--arch", "base"])
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--task", "patchcore", "--coreset-ratio", "0"])
  assert benchmark.parse_args(["--task", "patchcore"]).arch == "wide_resnet50_2"
  with pytest.raises(SystemExit):  # not a multiple of DINOv2's 14-px patches
    benchmark.parse_args(["--task", "anomalydino", "--image-size", "450"])
  with pytest.raises(SystemExit):  # a ResNet for AnomalyDINO
    benchmark.parse_args(["--task", "anomalydino", "--arch", "resnet18"])
  assert benchmark.parse_args(["--task", "anomalydino"]).arch == "dinov2_vits14"
  assert benchmark.parse_args([]).arch == "base"


def test_input_benchmark_runs(capsys):
  import benchmark_input

  assert benchmark_input.main(["--seconds", "0.05", "--threads", "1"]) == 0
  out = capsys.readouterr().out
  assert "mvtec_rgb_png_1024: 1 thread(s)" in out and "cores per chip" in out


def test_bulk_and_input_tasks_are_dispatched(monkeypatch):
  import benchmark_bulk
  import benchmark_input

  seen = []
  monkeypatch.setattr(benchmark_bulk, "main", lambda argv: seen.append(argv) or 0)
  assert benchmark.main(["--task", "bulk", "--images", "8"]) == 0
  assert benchmark.main(["--images=4", "--task=bulk"]) == 0
  assert seen == [["--images", "8"], ["--images=4"]]
  monkeypatch.setattr(benchmark_input, "main", lambda argv: seen.append(("input", argv)) or 0)
  assert benchmark.main(["--task", "input", "--seconds", "1"]) == 0
  assert seen[-1] == ("input", ["--seconds", "1"])


@pytest.mark.parametrize(
  "script",
  [
    "tools/benchmarks/benchmark_input.py",
    "tools/benchmarks/benchmark_bulk.py",
    "tools/studies/scoring_study.py",
    "tools/studies/evaluate_mt.py",
  ],
)
def test_moved_tools_run_from_their_folders(script):
  """Each tool finds its shared module beside it when run as a script, from the root."""
  root = TOOLS.parent
  proc = subprocess.run(
    [sys.executable, script, "--help"], cwd=root, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith("usage:")

"""`tools/device_check.sh`: its syntax, options and the plan its dry run prints.

The script itself needs a GPU or TPU machine; here only `--dry-run` runs, which must
neither need an accelerator nor write anything. No JAX is imported.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "device_check.sh"
ARCHS = ("base", "large")
DTYPES = ("float32", "bfloat16")
BATCHES = (8, 32)


def _bash(*args, cwd=REPO) -> subprocess.CompletedProcess:
  return subprocess.run(
    ["bash", str(SCRIPT), *args],
    cwd=cwd,
    env=dict(os.environ),
    capture_output=True,
    text=True,
    timeout=60,
  )


def _dry_run(tmp_path, *extra) -> tuple[str, pathlib.Path]:
  out = tmp_path / "out"
  venv = tmp_path / "venv"
  args = ["--dry-run", "--out", str(out), "--python", sys.executable, "--venv", str(venv)]
  proc = _bash(*args, *extra)
  assert proc.returncode == 0, proc.stderr
  # Nothing was made: at most an empty output folder, and no virtual environment.
  assert not out.exists() or not any(out.iterdir())
  assert not venv.exists()
  return proc.stdout, out


def _benchmark_lines(plan: str) -> list[str]:
  return [
    line for line in plan.splitlines() if line.startswith("+ ") and " tools/benchmark.py " in line
  ]


def test_syntax():
  proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def test_dry_run_prints_the_whole_plan(tmp_path):
  plan, out = _dry_run(tmp_path)
  # The parity tests on the device, in full float32.
  parity = [line for line in plan.splitlines() if line.startswith("+ ") and " -m pytest " in line]
  assert len(parity) == 1
  assert "-m pytest -q tests/test_checkpoint_parity.py tests/test_attention.py" in parity[0]
  assert re.search(r"JAX_PLATFORMS=(cuda|tpu)\b", parity[0])
  assert "JAX_DEFAULT_MATMUL_PRECISION=highest" in parity[0]
  assert "XLA_FLAGS= " in parity[0]
  # Every zero-shot configuration, and the fine-tune, each JAX only, each to its JSON.
  lines = [
    line
    for line in _benchmark_lines(plan)
    if "--task zero_shot" in line or "--task finetune" in line
  ]
  assert len(lines) == len(ARCHS) * len(DTYPES) * len(BATCHES) + 1
  # The DINOv2 detectors at the ViT-S shape, each to its JSON.
  dino = [
    line for line in _benchmark_lines(plan) if "--task anomalydino" in line or "--task musc" in line
  ]
  assert len(dino) == 2 and all(
    line.startswith("+ timeout ") and "--json " in line for line in dino
  )
  for arch in ARCHS:
    for dtype in DTYPES:
      for batch in BATCHES:
        head = f"--task zero_shot --arch {arch} --dtype {dtype} --batch {batch} --num-masks 32"
        json_path = f"--json {out}/zs_{arch}_{dtype}_b{batch}.json"
        assert sum(head in line and json_path in line for line in lines) == 1, head
  finetune = [line for line in lines if "--task finetune" in line]
  assert len(finetune) == 1
  assert "--arch large --dtype bfloat16" in finetune[0]
  assert f"--json {out}/finetune_large_bf16.json" in finetune[0]
  for line in lines:
    assert "--no-torch" in line and "--steps 3 --warmup 1" in line
    assert line.startswith("+ timeout "), line  # Each step under its own timeout.
    assert "--attention auto" in line, line
  # Without an accelerator here, the plan still shows how JAX would be installed.
  assert "-m venv --system-site-packages" in plan
  assert re.search(r"pip install .*'jax\[(cuda12|tpu)\]' -e '\.\[test\]'", plan)
  assert f"merge (stdlib Python) into {out}/device_check.json" in plan


def test_dry_run_quick_runs_fewer_benchmarks(tmp_path):
  full = _benchmark_lines(_dry_run(tmp_path)[0])
  plan, _ = _dry_run(tmp_path, "--quick")
  quick = _benchmark_lines(plan)
  assert 0 < len(quick) < len(full)
  zero_shot = [line for line in quick if "--task zero_shot" in line]
  assert len(zero_shot) == 2
  assert any("--arch large --dtype bfloat16 --batch 32" in line for line in zero_shot)
  assert any("--arch base --dtype float32 --batch 8" in line for line in zero_shot)
  assert sum("--task finetune" in line for line in quick) == 1
  assert " -m pytest -q tests/test_checkpoint_parity.py" in plan


def test_dry_run_with_wheels_installs_only_from_them(tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  plan, _ = _dry_run(tmp_path, "--wheels", str(wheels))
  pip = [line for line in plan.splitlines() if " -m pip install " in line]
  assert pip
  for line in pip:
    assert f"--no-index --find-links {wheels}" in line, line


def test_help_exits_zero():
  proc = _bash("--help")
  assert proc.returncode == 0, proc.stderr
  for option in ("--out", "--wheels", "--python", "--venv", "--quick", "--dry-run"):
    assert option in proc.stdout
  assert "pip download -d wheels" in proc.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--no-such-option"], "unknown option: --no-such-option"),
    (["--out"], "--out needs a value"),
    (["--dry-run", "--wheels", "/no/such/folder"], "is not a folder"),
  ],
)
def test_bad_options_exit_nonzero_with_a_message(args, message):
  proc = _bash(*args)
  assert proc.returncode != 0
  assert message in proc.stderr

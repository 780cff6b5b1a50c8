#!/usr/bin/env bash
# tools/device_check.sh: check maeday_jax on a GPU or TPU machine in under five minutes,
# and write every figure into one JSON.
#
# Run it from the repository root on the accelerator machine:
#
#   bash tools/device_check.sh --out runs/device_check   # connected machine
#   bash tools/device_check.sh --wheels /mnt/wheels      # air-gapped: install only from there
#   bash tools/device_check.sh --quick                   # 2 zero-shot runs instead of 8
#   bash tools/device_check.sh --dry-run                 # print every command, run nothing
#
# What it does:
#   1. Environment. If --python already imports JAX on a GPU or TPU, a virtual
#      environment (--venv) is made with --system-site-packages so that the machine's
#      JAX is kept; otherwise one is made and "jax[cuda12]" (nvidia-smi present) or
#      "jax[tpu]" (/dev/accel* or /dev/vfio present) is installed into it; with neither
#      it stops: no accelerator found. A --venv that already has accelerator JAX is
#      reused as it is. Then: pip install -e ".[test]" (the JAX versions pinned).
#   2. Checks, each under its own timeout, in this order (a failure does not stop the
#      rest; one that would start with under 30 s of --budget left is skipped):
#      parity tests on the device (tests/test_checkpoint_parity.py, tests/test_attention.py;
#      full float32 matmuls); the zero-shot benchmark, JAX only (32 masks, ViT-B and
#      ViT-L, float32 and bfloat16, batch 8 and 32; --quick: ViT-L/bfloat16/32 and
#      ViT-B/float32/8 only); the LoRA fine-tune benchmark (ViT-L, bfloat16); the DINOv2
#      detectors' and PMAD's benchmarks at their real shapes (random weights).
#   3. Merge: OUT/device_check.json holds every step's status, duration, command and log
#      path, each benchmark's own JSON, the parity counts, and the machine (hostname,
#      GPUs, jax/jaxlib versions, devices); a table of the key figures is printed.
#      Logs: OUT/logs/. Exit status 0 when the parity tests passed, 1 otherwise.
#   A first run that has to download JAX may spend most of the budget on that: run it
#   again (the venv is reused) or give a larger --budget.
#
# Options:
#   --out DIR       where everything goes (default runs/device_check)
#   --wheels DIR    install only from this folder (pip --no-index --find-links DIR)
#   --python PY     interpreter to start from (default python3)
#   --venv DIR      virtual environment to make or reuse (default .venv-device)
#   --quick         fewer benchmark runs
#   --budget S      seconds for the whole run, set-up included (default 290)
#   --dry-run       print every command it would run, run nothing
#   -h, --help      this text
#
# The wheels folder for an air-gapped machine, made on a connected machine with the same
# OS, CPU architecture and Python version, from the repository root (about 3 GB for CUDA;
# for a TPU write "jax[tpu]"; for another Python add --python-version 3.X
# --platform manylinux_2_28_x86_64 --only-binary=:all:):
#
#   pip download -d wheels "jax[cuda12]" -r requirements.txt -r requirements-test.txt \
#     "setuptools>=68" wheel
#
# (setuptools and wheel are what pip needs to build the editable install offline.)

set -euo pipefail

usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
}

die() {
  printf 'device_check: %s\n' "$*" >&2
  exit 2
}

OUT=runs/device_check
WHEELS=""
PY=python3
VENV=.venv-device
QUICK=0
DRY_RUN=0
BUDGET=290

need_value() {
  # $1: the option, $2: its value (if any).
  if [[ $# -lt 2 || -z $2 || $2 == --* ]]; then
    die "$1 needs a value (see --help)"
  fi
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --out) need_value "$@"; OUT=$2; shift 2 ;;
    --out=*) OUT=${1#*=}; shift ;;
    --wheels) need_value "$@"; WHEELS=$2; shift 2 ;;
    --wheels=*) WHEELS=${1#*=}; shift ;;
    --python) need_value "$@"; PY=$2; shift 2 ;;
    --python=*) PY=${1#*=}; shift ;;
    --venv) need_value "$@"; VENV=$2; shift 2 ;;
    --venv=*) VENV=${1#*=}; shift ;;
    --budget) need_value "$@"; BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option: $1 (see --help)" ;;
  esac
done

[[ $BUDGET =~ ^[0-9]+$ ]] || die "--budget must be a whole number of seconds, not '$BUDGET'"

# Paths given relative to where the script was started; then work from the repository root.
abspath() {
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/$1" ;;
  esac
}
OUT=$(abspath "$OUT")
VENV=$(abspath "$VENV")
if [[ -n $WHEELS ]]; then
  WHEELS=$(abspath "$WHEELS")
  [[ -d $WHEELS ]] || die "--wheels $WHEELS is not a folder"
fi
if [[ $PY == */* ]]; then
  PY=$(abspath "$PY")
  [[ -x $PY ]] || die "--python $PY is not an executable"
else
  PY_FOUND=$(command -v "$PY") || die "--python $PY: not found on PATH"
  PY=$PY_FOUND
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

VPY=$VENV/bin/python
LOGS=$OUT/logs
STEPS_TSV=$LOGS/steps.tsv
PIP=(-m pip install --disable-pip-version-check)
if [[ -n $WHEELS ]]; then
  PIP+=(--no-index --find-links "$WHEELS")
fi
RESERVE=20   # seconds kept for the merge and for `timeout -k`
MIN_STEP=30  # a step that would get less than this is skipped
START_EPOCH=$(date +%s)
DEADLINE=$((SECONDS + BUDGET))

say() { printf '[device_check] %s\n' "$*"; }

# One argument as the shell would need it: plain when safe, else single-quoted; inline
# programs (several lines) are abbreviated.
quote_arg() {
  local a=$1
  if [[ $a == *$'\n'* ]]; then
    printf "'<inline program, %s lines>'" "$(printf '%s\n' "$a" | wc -l | tr -d ' ')"
  elif [[ -n $a && $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

show() {
  local line="+" a
  for a in "$@"; do
    line+=" $(quote_arg "$a")"
  done
  printf '%s\n' "$line"
}

# `run_step NAME TIMEOUT JSON -- CMD...`: CMD under `timeout`, output to LOGS/NAME.log,
# its status, return code, duration and command appended to steps.tsv. Never fails itself:
# STEP_STATUS says ok, failed, timeout or skipped. JSON ("" for none) is the figure file
# the step writes (removed first, so that no stale file is merged).
STEP_STATUS=""
SHOW_LOG=0
SKIP_REST=""
run_step() {
  local name=$1 limit=$2 json=$3
  shift 4
  local cmdline log="$LOGS/$name.log" left rc status start end seconds
  cmdline=$(show "$@")
  cmdline=${cmdline#+ }
  if [[ $DRY_RUN == 1 ]]; then
    show timeout -k 10 "$limit" "$@"
    STEP_STATUS=ok
    return 0
  fi
  left=$((DEADLINE - SECONDS - RESERVE))
  if [[ -n $SKIP_REST || $left -lt $MIN_STEP ]]; then
    status=skipped
    [[ -n $SKIP_REST ]] || SKIP_REST="time budget (--budget $BUDGET) spent"
    say "$name: skipped ($SKIP_REST)"
    printf '%s\t%s\t\t0\t%s\t%s\t%s\t%s\n' "$name" "$status" "$limit" "$json" "$SKIP_REST" \
      "$cmdline" >>"$STEPS_TSV"
    STEP_STATUS=$status
    return 0
  fi
  ((limit <= left)) || limit=$left
  [[ -z $json ]] || rm -f "$json"
  say "$name (timeout ${limit} s)"
  show "$@"
  start=$(date +%s.%N)
  set +e
  timeout -k 10 "$limit" "$@" >"$log" 2>&1 </dev/null
  rc=$?
  set -e
  end=$(date +%s.%N)
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$seconds" "$limit" \
    "$json" "$log" "$cmdline" >>"$STEPS_TSV"
  if [[ $status == ok ]]; then
    say "  ok (${seconds} s)"
    if [[ $SHOW_LOG == 1 ]]; then
      sed 's/^/    /' "$log"
    fi
  else
    say "  ${status^^} (exit ${rc}, ${seconds} s); the end of $log:"
    tail -n 15 "$log" | sed 's/^/    /'
  fi
  STEP_STATUS=$status
}

# The backend a Python's JAX picks by itself ("" when it has no JAX or fails).
PROBE_PY='import jax; print(jax.default_backend())'
probe_backend() {
  local py=$1
  if [[ $DRY_RUN == 1 ]]; then
    show env -u JAX_PLATFORMS "$py" -c "$PROBE_PY"
    return 0
  fi
  [[ -x $py ]] || return 0
  timeout -k 5 120 env -u JAX_PLATFORMS "$py" -c "$PROBE_PY" 2>>"$LOGS/probe.log" </dev/null |
    tail -n 1 || true
}

# The accelerator this machine has, from what is visible without running anything.
detect_accelerator() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo cuda12
  elif compgen -G '/dev/accel*' >/dev/null || [[ -e /dev/vfio ]]; then
    echo tpu
  fi
}

# The value of JAX_PLATFORMS for a backend ("gpu": cuda with nvidia-smi, else any GPU).
platform_of() {
  case $1 in
    tpu) echo tpu ;;
    gpu)
      if command -v nvidia-smi >/dev/null 2>&1; then echo cuda; else echo gpu; fi ;;
    cuda12) echo cuda ;;
    *) echo "$1" ;;
  esac
}

# A --python that is itself a virtual environment: its site-packages, which
# `venv --system-site-packages` would not see (that reaches the base installation only).
PARENT_SITE_PY='import site, sys
if sys.prefix != sys.base_prefix:
  print("\n".join(site.getsitepackages()))'
VENV_SITE_PY='import sysconfig; print(sysconfig.get_paths()["purelib"])'
PIN_PY='from importlib.metadata import version
for name in ("jax", "jaxlib"):
  print(f"{name}=={version(name)}")'

# Merge everything into OUT/device_check.json and print the key figures (stdlib only).
merge() {
  local merge_py=$VPY
  [[ -x $merge_py ]] || merge_py=$PY
  if [[ $DRY_RUN == 1 ]]; then
    say "merge (stdlib Python) into $OUT/device_check.json"
    printf "+ %s - <<'EOF'  # merge\n" "$merge_py"
    return 0
  fi
  DC_OUT=$OUT DC_LOGS=$LOGS DC_STEPS=$STEPS_TSV DC_MODE=${MODE:-} DC_PLATFORM=${PLATFORM:-} \
    DC_PYTHON=$PY DC_VENV=$VENV DC_WHEELS=$WHEELS DC_QUICK=$QUICK DC_BUDGET=$BUDGET \
    DC_START=$START_EPOCH DC_ACCEL=${ACCEL:-} \
    "$merge_py" - <<'EOF'
import datetime
import json
import os
import re
import socket
import time

env = os.environ
out, logs = env["DC_OUT"], env["DC_LOGS"]


def read_lines(path):
  try:
    with open(path) as f:
      return [line.rstrip("\n") for line in f]
  except OSError:
    return []


def pytest_counts(log):
  """Counts from pytest's last summary line ('3 passed, 1 skipped in 2.1s')."""
  words = r"passed|failed|skipped|errors?|xfailed|xpassed|warnings?|deselected"
  for line in reversed(read_lines(log)):
    found = re.findall(rf"(\d+) ({words})\b", line)
    if found and re.search(r"\bin [\d.]+s", line):
      counts = {}
      for n, word in found:
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[word] = counts.get(word, 0) + int(n)
      return {"summary": line.strip(" ="), **counts}
  return {}


steps = {}
for line in read_lines(env["DC_STEPS"]):
  if not line:
    continue
  name, status, rc, seconds, limit, json_path, log, command = line.split("\t", 7)
  step = {
    "status": status,
    "returncode": int(rc) if rc else None,
    "seconds": float(seconds),
    "timeout_s": int(limit),
    "command": command,
  }
  if status == "skipped":
    step["reason"] = log
  else:
    step["log"] = os.path.relpath(log, out)
  if json_path:
    step["json"] = os.path.relpath(json_path, out)
    try:
      with open(json_path) as f:
        step["result"] = json.load(f)
    except (OSError, ValueError) as e:
      step["result"] = None
      if status == "ok":  # It ran but wrote no (readable) figures.
        step["status"] = "no_json"
        step["json_error"] = str(e)
  if name == "parity" and status != "skipped":
    step["pytest"] = pytest_counts(log)
  steps[name] = step

machine = {"hostname": socket.gethostname()}
try:
  with open(os.path.join(logs, "machine.json")) as f:
    machine.update(json.load(f))
except (OSError, ValueError):
  pass
gpus = [g for g in read_lines(os.path.join(logs, "nvidia_smi_query.txt")) if g.strip()]
if gpus:
  machine["nvidia_smi"] = gpus

parity = steps.get("parity", {"status": "not run"})
parity_ok = parity.get("status") == "ok"
report = {
  "tool": "tools/device_check.sh",
  "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  "wall_s": round(time.time() - int(env["DC_START"]), 1),
  "parity_passed": parity_ok,
  "parity": {k: parity.get(k) for k in ("status", "seconds", "pytest") if k in parity},
  "options": {
    "quick": env["DC_QUICK"] == "1",
    "budget_s": int(env["DC_BUDGET"]),
    "python": env["DC_PYTHON"],
    "venv": env["DC_VENV"],
    "wheels": env["DC_WHEELS"] or None,
  },
  "environment": {
    "mode": env["DC_MODE"] or None,
    "accelerator": env["DC_ACCEL"] or None,
    "jax_platforms": env["DC_PLATFORM"] or None,
  },
  "machine": machine,
  "steps": steps,
}
path = os.path.join(out, "device_check.json")
with open(path, "w") as f:
  json.dump(report, f, indent=2)

# The key figures, found by name wherever the benchmark JSONs put them.
KEY = re.compile(
  r"images_per_s|gflops_per_s|step_s|step_median_s|step_min_s|seconds|compile|first_call"
  r"|lower_s|projected"
)


def figures(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from figures(v, f"{prefix}{k}.")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    key = prefix[:-1].rsplit(".", 1)[-1]
    if KEY.search(key):
      yield prefix[:-1], tree


def fmt(x):
  return f"{x:.4g}" if isinstance(x, float) else str(x)


print()
devices = machine.get("devices") or []
kinds = sorted({d.get("kind", "?") for d in devices if isinstance(d, dict)})
print(
  f"device_check on {machine['hostname']}: {len(devices)} x {', '.join(kinds) or '?'}, "
  f"jax {machine.get('jax', '?')}, jaxlib {machine.get('jaxlib', '?')}, "
  f"backend {machine.get('backend', '?')}"
)
for gpu in gpus:
  print(f"  GPU: {gpu}")
print(f"{'step':<26} {'status':<8} {'seconds':>8}")
for name, step in steps.items():
  extra = ""
  if name == "parity":
    extra = (step.get("pytest") or {}).get("summary", "")
  print(f"{name:<26} {step['status']:<8} {step['seconds']:>8.1f}  {extra}".rstrip())
  found = list(figures(step.get("result") or {}))
  for i in range(0, len(found), 3):
    print("    " + "   ".join(f"{k} = {fmt(v)}" for k, v in found[i : i + 3]))
print(f"parity {'PASSED' if parity_ok else 'FAILED'}; wrote {path}")
EOF
}

finish() {
  merge || say "the merge failed; the step logs are in $LOGS"
  if [[ $DRY_RUN == 1 ]]; then
    exit 0
  fi
  if grep -q $'^parity\tok\t' "$STEPS_TSV" 2>/dev/null; then
    exit 0
  fi
  exit 1
}

ATTENTION=(--attention auto)

if [[ $DRY_RUN == 1 ]]; then
  say "dry run: nothing is run or written; the plan:"
else
  mkdir -p "$LOGS"
  : >"$STEPS_TSV"
  rm -f "$OUT/device_check.json" "$LOGS/probe.log" "$LOGS/machine.json" \
    "$LOGS/nvidia_smi_query.txt"
fi

# --- 1. Environment -----------------------------------------------------------------------

say "repository $REPO; python $PY; venv $VENV; out $OUT${WHEELS:+; wheels $WHEELS}"
ACCEL=$(detect_accelerator)
MODE=""
PLATFORM=""
PIN_FILE=$LOGS/jax_pins.txt

if command -v nvidia-smi >/dev/null 2>&1; then
  if [[ $DRY_RUN == 1 ]]; then
    show nvidia-smi -L
    show nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  else
    timeout 30 nvidia-smi -L 2>&1 | sed 's/^/  /' || true
    timeout 30 nvidia-smi --query-gpu=name,memory.total --format=csv,noheader \
      >"$LOGS/nvidia_smi_query.txt" 2>/dev/null || true
  fi
fi

if [[ $DRY_RUN == 1 ]]; then
  # Both branches, without probing: the probe imports JAX.
  say "reuse $VENV if its JAX runs on a GPU/TPU:"
  probe_backend "$VPY"
  say "else, if $PY's JAX runs on a GPU/TPU (keep it):"
  probe_backend "$PY"
  show "$PY" -m venv --system-site-packages "$VENV"
  show "$PY" -c "$PARENT_SITE_PY"
  say "  (its site-packages, when $PY is a venv, go into a .pth file in $VENV's site-packages)"
  if [[ -z $ACCEL ]]; then
    say "else install the accelerator JAX (dry run: no accelerator visible here, assuming a GPU):"
    ACCEL=cuda12
  else
    say "else install the accelerator JAX ($ACCEL found):"
  fi
  show "$PY" -m venv "$VENV"
  show "$VPY" "${PIP[@]}" "jax[$ACCEL]" -e ".[test]"
  say "then, in every case (the JAX versions pinned in $PIN_FILE):"
  show "$VPY" -c "$PIN_PY"
  show "$VPY" "${PIP[@]}" -c "$PIN_FILE" -e ".[test]"
  say "  (if that fails: the same with --no-build-isolation)"
  MODE=dry-run
  PLATFORM=$(platform_of "$ACCEL")
else
  BACKEND=$(probe_backend "$VPY")
  if [[ $BACKEND == gpu || $BACKEND == tpu ]]; then
    MODE=venv
    PLATFORM=$(platform_of "$BACKEND")
    say "reusing $VENV: its JAX runs on $BACKEND"
  else
    BACKEND=$(probe_backend "$PY")
    if [[ $BACKEND == gpu || $BACKEND == tpu ]]; then
      say "$PY's JAX runs on $BACKEND: keeping it (venv with --system-site-packages)"
      run_step setup_venv 120 "" -- "$PY" -m venv --system-site-packages "$VENV"
      PARENT_SITE=$("$PY" -c "$PARENT_SITE_PY" 2>/dev/null) || PARENT_SITE=""
      if [[ $STEP_STATUS == ok && -n $PARENT_SITE ]]; then
        VENV_SITE=$("$VPY" -c "$VENV_SITE_PY" 2>/dev/null) || VENV_SITE=""
        if [[ -d $VENV_SITE ]]; then
          printf '%s\n' "$PARENT_SITE" >"$VENV_SITE/_device_check_parent.pth"
          say "  $PY is a venv: its site-packages added via $VENV_SITE/_device_check_parent.pth"
        fi
      fi
      if [[ $(probe_backend "$VPY") == "$BACKEND" ]]; then
        MODE=system
        PLATFORM=$(platform_of "$BACKEND")
      else
        say "  but $VPY does not see it; installing the accelerator JAX instead"
      fi
    fi
  fi
  if [[ -z $MODE ]]; then
    if [[ -z $ACCEL ]]; then
      say "no accelerator found: no nvidia-smi, no /dev/accel* or /dev/vfio (TPU), and $PY" >&2
      say "has no JAX running on a GPU or TPU. Run this on a GPU or TPU machine." >&2
      exit 2
    fi
    MODE=installed
    PLATFORM=$(platform_of "$ACCEL")
    say "installing jax[$ACCEL] into $VENV"
    [[ -x $VPY ]] || run_step setup_venv 120 "" -- "$PY" -m venv "$VENV"
    if [[ ! -x $VPY ]]; then
      say "could not make $VENV (Debian/Ubuntu: apt-get install python3-venv; or give" >&2
      say "--python an interpreter that has the venv module)" >&2
      finish
    fi
    run_step setup_install 240 "" -- "$VPY" "${PIP[@]}" "jax[$ACCEL]" -e ".[test]"
    if [[ $STEP_STATUS == failed ]]; then
      run_step setup_install_no_isolation 240 "" -- \
        "$VPY" "${PIP[@]}" --no-build-isolation "jax[$ACCEL]" -e ".[test]"
    fi
  fi
  if [[ -d $VENV && ! -e $VENV/.gitignore ]]; then
    printf '*\n' >"$VENV/.gitignore"
  fi
  if [[ $MODE != installed ]]; then
    # Pin the JAX that was found, so that no dependency of the project replaces it.
    "$VPY" -c "$PIN_PY" >"$PIN_FILE" 2>>"$LOGS/probe.log" || : >"$PIN_FILE"
    run_step setup_package 180 "" -- "$VPY" "${PIP[@]}" -c "$PIN_FILE" -e ".[test]"
    if [[ $STEP_STATUS == failed ]]; then
      run_step setup_package_no_isolation 180 "" -- \
        "$VPY" "${PIP[@]}" --no-build-isolation -c "$PIN_FILE" -e ".[test]"
    fi
  fi
  say "environment: $MODE; JAX_PLATFORMS=$PLATFORM"
fi

# What the environment holds and sees (also checks that everything imports).
MACHINE_PY='import json, os, platform, socket, sys
from importlib import metadata
import jax
import flax, optax, pytest, maeday_jax  # noqa: F401  (the environment is complete)

def version(name):
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None

devices = []
for d in jax.local_devices():
  entry = {"id": d.id, "platform": d.platform, "kind": d.device_kind, "str": str(d)}
  try:
    stats = d.memory_stats() or {}
    if "bytes_limit" in stats:
      entry["memory_bytes_limit"] = stats["bytes_limit"]
  except Exception:
    pass
  devices.append(entry)
plugins = ("jax-cuda12-plugin", "jax-cuda12-pjrt", "libtpu", "libtpu-nightly")
info = {
  "hostname": socket.gethostname(),
  "python": sys.version.split()[0],
  "os": platform.platform(),
  "cpu_count": os.cpu_count(),
  "jax": jax.__version__,
  "jaxlib": version("jaxlib"),
  "plugins": {p: version(p) for p in plugins if version(p)},
  "flax": version("flax"),
  "backend": jax.default_backend(),
  "process_count": jax.process_count(),
  "device_count": jax.device_count(),
  "devices": devices,
}
with open(sys.argv[1], "w") as f:
  json.dump(info, f, indent=2)
print("jax %s, jaxlib %s, backend %s" % (info["jax"], info["jaxlib"], info["backend"]))
for d in devices:
  print("  %s: %s" % (d["str"], d["kind"]))'

SHOW_LOG=1
run_step machine 120 "" -- env JAX_PLATFORMS="$PLATFORM" "$VPY" -c "$MACHINE_PY" \
  "$LOGS/machine.json"
SHOW_LOG=0

# --- 2. Checks ------------------------------------------------------------------------------

run_step parity 150 "" -- env JAX_PLATFORMS="$PLATFORM" JAX_DEFAULT_MATMUL_PRECISION=highest \
  XLA_FLAGS= "$VPY" -m pytest -q tests/test_checkpoint_parity.py tests/test_attention.py

zero_shot() {
  local arch=$1 dtype=$2 batch=$3 name="zs_$1_$2_b$3"
  run_step "$name" 100 "$OUT/$name.json" -- env JAX_PLATFORMS="$PLATFORM" \
    "$VPY" tools/benchmark.py --task zero_shot --arch "$arch" --dtype "$dtype" \
    --batch "$batch" --num-masks 32 --steps 3 --warmup 1 --no-torch "${ATTENTION[@]}" \
    --json "$OUT/$name.json"
}

# The most telling runs first, so that a short budget still gets them.
zero_shot large bfloat16 32
zero_shot base float32 8
run_step finetune_large_bf16 150 "$OUT/finetune_large_bf16.json" -- \
  env JAX_PLATFORMS="$PLATFORM" "$VPY" tools/benchmark.py --task finetune --arch large \
  --dtype bfloat16 --steps 3 --warmup 1 --no-torch "${ATTENTION[@]}" \
  --json "$OUT/finetune_large_bf16.json"
if [[ $QUICK == 0 ]]; then
  zero_shot base bfloat16 8
  zero_shot base float32 32
  zero_shot base bfloat16 32
  zero_shot large float32 8
  zero_shot large bfloat16 8
  zero_shot large float32 32
fi
# The DINOv2 detectors at the real ViT-S shape (random weights: the cost, not the figures),
# and MuSc's image AUROC against its group size where MVTec AD and the weights are here.
run_step anomalydino 90 "$OUT/anomalydino.json" -- env JAX_PLATFORMS="$PLATFORM" \
  "$VPY" tools/benchmark.py --task anomalydino --batch 16 --steps 3 --warmup 1 --no-torch \
    --json "$OUT/anomalydino.json"
run_step musc 120 "$OUT/musc.json" -- env JAX_PLATFORMS="$PLATFORM" \
  "$VPY" tools/benchmark.py --task musc --groups 8,32,64 --json "$OUT/musc.json"
if [[ -n ${MAEDAY_MVTEC:-} ]]; then
  run_step musc_groups 240 "$OUT/musc_groups.json" -- env JAX_PLATFORMS="$PLATFORM" \
    "$VPY" tools/studies/musc_group_size.py --data-path "$MAEDAY_MVTEC" \
    --categories bottle,screw --groups 8,32,all --repeats 2 --json "$OUT/musc_groups.json"
fi
# APRIL-GAN's released recipe where VisA, MVTec AD and the CLIP weights are (adapters on
# VisA, then MVTec AD zero-shot; configs/april_gan.py), with its published figures beside.
if [[ -n ${MAEDAY_MVTEC:-} && -n ${MAEDAY_VISA:-} ]]; then
  run_step april_gan_fit 600 "" -- env JAX_PLATFORMS="$PLATFORM" "$VPY" -m maeday_jax.main \
    --config configs/april_gan.py --workdir "$OUT/april_gan_visa" \
    --config.april_gan.aux_data.path="$MAEDAY_VISA" --config.data.path="$MAEDAY_MVTEC" \
    --config.data.categories=bottle
  run_step april_gan_mvtec 600 "" -- env JAX_PLATFORMS="$PLATFORM" "$VPY" -m maeday_jax.main \
    --config configs/evaluate.py --workdir "$OUT/april_gan_mvtec" \
    --config.detector="$OUT/april_gan_visa/detector" --config.data.name=mvtec_ad \
    --config.data.path="$MAEDAY_MVTEC"
fi
# PMAD at the paper's shape (ViT-B encoder + decoder, 224 px, WideResNet-50-2 features;
# random weights: the cost of a training step and of scoring).
run_step pmad 120 "$OUT/pmad.json" -- env JAX_PLATFORMS="$PLATFORM" \
  "$VPY" tools/benchmark.py --task pmad --variant base --image-size 224 \
  --features-backbone wide_resnet50_2 --target codebook --batch 32 --steps 3 --warmup 1 \
  --json "$OUT/pmad.json"

# --- 3. Merge ---------------------------------------------------------------------------------

finish

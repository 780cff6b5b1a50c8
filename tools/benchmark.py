"""maeday_jax's speed against PyTorch's (reference models, anomalib), same machine, same work.

Four tasks, each run by JAX and (optionally) by an independent PyTorch implementation
or anomalib's own model, on the same random weights (official key layout, generated from
`--seed` by NumPy on both sides), and tools of their own:

- `--task zero_shot` (default; `benchmark_zero_shot.py`): score B images (`--batch`, 8)
  under N = 32 random masks: reconstruction, blurred squared error, mean, max. The two
  sides get identical images and masks, and their image scores are compared.
- `--task finetune` (`benchmark_finetune.py`): the few-shot LoRA step, `--batch` (32)
  augmented, masked copies of `--shots` (1) images, backward into rank-32 LoRA factors,
  SGD; the paper's fine-tune is `--iterations` (50) such steps, and the report projects
  its duration. A check on one fixed batch (losses before and after two SGD updates from
  the same LoRA factors) must agree between the sides.
- `--task patchcore` (`benchmark_patchcore.py`): PatchCore on a ResNet (`--arch
  wide_resnet50_2`, the default for this task; `resnet18`; the tiny `test_wide`): the fit
  (`--shots` (1) images -> a memory bank of `--coreset-ratio` (0.1) of their patch
  embeddings) and the scoring of `--batch` (8) images. PyTorch runs anomalib's
  `PatchcoreModel` when the `--torch-python` interpreter has anomalib, otherwise the same
  computation in plain PyTorch (`--torch-model`). Image scores with the full bank
  (coreset ratio 1.0) must agree between the sides. Reported besides: the fit time, the
  bank size and each side's peak memory.
- `--task anomalydino` (`benchmark_anomalydino.py`): AnomalyDINO on DINOv2 (`--arch
  dinov2_vits14`, the default for this task; dinov2_vitb14; the tiny dinov2_test) at
  `--image-size` (448): the fit (`--shots` (1) images at 4 rotations -> a bank of their
  patch tokens) and the scoring of `--batch` (8) images. PyTorch runs anomalib's
  `AnomalyDINOModel` when the `--torch-python` interpreter has anomalib, otherwise the same
  computation in plain PyTorch (`--torch-model`). Image scores at the backbone's training
  size must agree between the sides.
- `--task bulk` (`benchmark_bulk.py`, JAX only, its own options): the bulk scoring job
  (`configs/score.py`) end to end on a synthetic folder, for the tiny and `small` models
  with 1 and 2 processes, and the input pipeline alone.
- `--task input` (`benchmark_input.py`, no model, its own options): the input pipeline
  (decode, resize, normalise) per CPU core, and the cores one accelerator needs.
- `--task musc` (`benchmark_musc.py`, JAX only, its own options): MuSc's scoring speed
  and peak memory against its group size.
- `--task serve` (`benchmark_serve.py`, JAX only, its own options): the scoring service
  (`maeday_jax.serve`) on loopback: requests/s and p50/p99 latency under concurrent load.
- `--task pmad` (`benchmark_pmad.py`, JAX only, its own options): PMAD's reconstructor
  training step and the detector's scoring: compile time, s/step, images/s, peak memory.

The task modules (`benchmark_*.py`) live in `tools/benchmarks/`, the independent PyTorch
models the PyTorch sides run in `tools/references/`.

Reported: step time, throughput, achieved GFLOP/s against an analytic FLOP count
(matmuls only), the ratio of the two sides, compile / first-iteration time apart from
the steady state, the machine, and the agreement check.

PyTorch is optional. JAX runs in this interpreter; PyTorch runs in a subprocess of this
same file (`--torch-worker`, which imports neither JAX nor `maeday_jax`) under
`--torch-python` (default: this interpreter when it can import torch and timm), so the
two may live in different virtual environments. `--no-torch` skips it.

CPU (the commands behind the README's figures):

    python tools/benchmark.py --arch base --batch 8 --steps 3 --warmup 1 --interleave \\
        --torch-python /work/venv-torch/bin/python --json runs/bench_base_cpu.json
    python tools/benchmark.py --task finetune --arch base --steps 3 --warmup 1 \\
        --interleave --torch-python /work/venv-torch/bin/python
    python tools/benchmark.py --task patchcore --arch wide_resnet50_2 --shots 1 --batch 8 \\
        --steps 3 --warmup 1 --interleave --torch-python /work/venv-anomalib/bin/python
    python tools/benchmark.py --task anomalydino --batch 8 --steps 3 --warmup 1 \\
        --interleave --torch-python /work/venv-anomalib/bin/python

By default PyTorch runs all its steps first, then JAX. `--interleave` keeps both alive
and alternates single steps (the order flipping every round), so that a shared machine's
changing load hits both sides alike: use it whenever others use the machine.

GPU: install a CUDA jaxlib (`pip install -U "jax[cuda12]"`) and a CUDA build of torch in
the PyTorch environment, then run the same command with `--torch-device cuda`; on
accelerators use `--dtype bfloat16` as well (parameters stay float32, matmuls in
bfloat16; PyTorch uses `torch.autocast` to the same effect). In float32 on a GPU the
worker enables TF32 matmuls, as JAX uses them by default there (set
`JAX_DEFAULT_MATMUL_PRECISION=highest` in the environment for full float32 on the JAX
side instead, and compare with care). The paper's figure for the fine-tune is about
100 s for ViT-L on an A100: `--task finetune --arch large --torch-device cuda`. TPU:
`pip install -U "jax[tpu]"` and the same command with `--no-torch` (there is no PyTorch
side on TPU). JAX splits the batch over all local devices (`--batch` must be a multiple
of their number). Without `--interleave` the PyTorch worker runs first, so that JAX's GPU
memory preallocation cannot starve it; with it, JAX preallocation is turned off
(`XLA_PYTHON_CLIENT_PREALLOCATE=false`) for `--torch-device cuda`.

JAX options worth trying: `--mask-batch-size` (zero-shot; None, the `maeday_jax.zero_shot`
default: all masks in one vmapped pass, B x N reconstructions at once like the PyTorch
side; k: a loop over chunks of k masks, which bounds memory) and XLA flags through the
environment (`XLA_FLAGS=...`). PyTorch tries fused (`F.scaled_dot_product_attention`)
and unfused (explicit softmax) attention and reports the faster one unless
`--torch-attention` picks one (the MAE tasks; PatchCore and AnomalyDINO run one eager
PyTorch model). For PatchCore and AnomalyDINO on GPU/TPU see their modules.

Timings on shared machines are noisy: the report includes the load average at the start
and the end, every step's wall and process CPU time, and the medians are what the ratio
uses.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shutil
import sys

# The task modules, beside this entry point's folder (the PyTorch worker, this file under
# another interpreter, finds them the same way).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks"))

import benchmark_anomalydino  # noqa: E402
import benchmark_finetune  # noqa: E402
import benchmark_patchcore  # noqa: E402
import benchmark_zero_shot  # noqa: E402
from benchmark_common import (  # noqa: E402
  ARCHS,
  RESNET_ARCHS,
  BackgroundLoad,
  TorchProcess,
  emit,
  finish,
  log,
  machine_info,
  modules_importable,
  torch_importable,
)

# Per task: the module with describe_work/compare/report_lines and WORKER_ARGS, and the
# JAX and PyTorch sides.
TASKS = {
  "zero_shot": (
    benchmark_zero_shot,
    benchmark_zero_shot.JaxScoring,
    benchmark_zero_shot.TorchScoring,
  ),
  "finetune": (
    benchmark_finetune,
    benchmark_finetune.JaxFinetune,
    benchmark_finetune.TorchFinetune,
  ),
  "patchcore": (
    benchmark_patchcore,
    benchmark_patchcore.JaxPatchcore,
    benchmark_patchcore.TorchPatchcore,
  ),
  "anomalydino": (
    benchmark_anomalydino,
    benchmark_anomalydino.JaxAnomalyDino,
    benchmark_anomalydino.TorchAnomalyDino,
  ),
}
DEFAULT_BATCH = {"zero_shot": 8, "finetune": 32, "patchcore": 8, "anomalydino": 8}
TITLES = {
  "zero_shot": "zero-shot scoring",
  "finetune": "few-shot LoRA fine-tuning",
  "patchcore": "PatchCore fit and scoring",
  "anomalydino": "AnomalyDINO fit and scoring",
}
DINO_ARCHS = benchmark_anomalydino.DINO_ARCHS
# The architectures each task runs (`--arch`), and its default one.
ARCH_TABLES = {
  "zero_shot": ARCHS,
  "finetune": ARCHS,
  "patchcore": RESNET_ARCHS,
  "anomalydino": DINO_ARCHS,
}
DEFAULT_ARCH = {
  "zero_shot": "base",
  "finetune": "base",
  "patchcore": "wide_resnet50_2",
  "anomalydino": "dinov2_vits14",
}


def torch_modes(args) -> list[str]:
  """The PyTorch runs the worker times: the attention paths of the MAE, or the one eager
  run of a memory-bank method (`TORCH_MODES` of its module)."""
  modes = getattr(TASKS[args.task][0], "TORCH_MODES", None)
  if modes is not None:
    return list(modes)
  return ["unfused", "fused"] if args.torch_attention == "both" else [args.torch_attention]


def torch_worker(args, arch: dict) -> int:
  """`--torch-worker`: all steps at once, or (`--torch-serve`) one per stdin command."""
  bench = TASKS[args.task][2](args, arch)
  for mode in bench.modes:
    bench.prepare(mode)
  if not args.torch_serve:
    for mode in bench.modes:
      for _ in range(args.steps):
        bench.step(mode)
  else:
    emit({"ready": True})
    for line in sys.stdin:
      command = line.split()
      if command == ["done"]:
        break
      if len(command) != 2 or command[0] != "step" or command[1] not in bench.modes:
        raise SystemExit(f"torch worker: bad command {line!r}")
      wall, cpu = bench.step(command[1])
      emit({"wall_s": wall, "cpu_s": cpu})
  emit(bench.summary())
  return 0


def _torch_process(args, python: str, serve: bool) -> TorchProcess:
  forward = ("task", *TASKS[args.task][0].WORKER_ARGS)
  return TorchProcess(args, python, serve=serve, forward=forward)


def run_sequential(args, arch: dict, python: str | None) -> tuple[dict | None, dict | None]:
  """PyTorch first (all its steps), then JAX: neither disturbs the other."""
  torch_result = jax_result = None
  # PyTorch first: once JAX has started it may hold most of an accelerator's memory.
  if python:
    torch_result = _torch_process(args, python, serve=False).finish()
  if not args.no_jax:
    bench = TASKS[args.task][1](args, arch)
    for _ in range(args.steps):
      bench.step()
    jax_result = bench.summary()
  return jax_result, torch_result


def run_interleaved(args, arch: dict, python: str) -> tuple[dict, dict]:
  """Alternates single JAX and PyTorch steps, so that both see the same background load.

  Both processes stay alive side by side (only one computes at a time), and the order
  within a round alternates, so slow drifts in the machine's load affect both equally.
  """
  if args.torch_device == "cuda":
    # Both sides hold GPU memory at once: JAX must not preallocate most of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  worker = _torch_process(args, python, serve=True)
  worker.read()  # set up, first iterations and warm-up done
  bench = TASKS[args.task][1](args, arch)
  modes = torch_modes(args)
  for i in range(args.steps):
    order = ["jax", *modes] if i % 2 == 0 else [*modes, "jax"]
    for side in order:
      if side == "jax":
        bench.step()
      else:
        worker.command(f"step {side}")
  worker.command("done")
  return bench.summary(), worker.finish()


def _mae_arch_line(cfg: dict, arch: dict) -> str:
  return (
    f"arch {cfg['arch']}: {arch['img_size']} px, patch {arch['patch_size']}, encoder "
    f"{arch['embed_dim']}/{arch['depth']}/{arch['num_heads']}, decoder "
    f"{arch['decoder_embed_dim']}/{arch['decoder_depth']}/{arch['decoder_num_heads']}"
  )


def report(result: dict) -> str:
  """The human-readable summary printed at the end."""
  cfg, arch, mach = result["config"], result["arch"], result["machine"]
  task = TASKS[cfg["task"]][0]
  arch_line = getattr(task, "arch_line", _mae_arch_line)
  lines = [
    f"MAEDAY {TITLES[cfg['task']]} benchmark, {result['timestamp_utc']}",
    f"machine: {mach['cpu_model']}, {mach['cpu_count']} CPUs "
    f"({mach.get('cpus_usable', '?')} usable), load average at start "
    f"{mach.get('load_average_1_5_15')}, at the end {result.get('load_average_end_1_5_15')}",
    arch_line(cfg, arch),
  ]
  return "\n".join(lines + task.report_lines(result))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--task",
    choices=sorted(TASKS),
    default="zero_shot",
    help=f"also {', '.join(sorted(OWN_TOOLS))}: tools with their own options (their --help)",
  )
  parser.add_argument(
    "--arch",
    choices=sorted({*ARCHS, *RESNET_ARCHS, *DINO_ARCHS}),
    default=None,
    help="MAE (zero_shot, finetune; default base), ResNet (patchcore; default "
    "wide_resnet50_2) or DINOv2 (anomalydino; default dinov2_vits14)",
  )
  parser.add_argument(
    "--batch",
    type=int,
    default=None,
    help="images (zero_shot, 8; patchcore and anomalydino, 8 scored) or copies (finetune, 32)",
  )
  parser.add_argument("--mask-ratio", type=float, default=0.75)
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  parser.add_argument(
    "--dtype",
    choices=["auto", "float32", "bfloat16"],
    default="auto",
    help="compute dtype of both sides; auto: JAX computes as the library does by default "
    "(model.dtype=auto: bfloat16 on GPUs, TPUs and CPUs with bfloat16 instructions; "
    "PatchCore's backbone float32), PyTorch in its own default, float32",
  )
  parser.add_argument(
    "--attention",
    choices=["auto", "einsum", "xla", "cudnn"],
    default="auto",
    help="JAX: the model's attention implementation (auto: einsum on CPU, cuDNN on GPU in "
    "half precision, XLA otherwise)",
  )
  parser.add_argument(
    "--background-load",
    type=int,
    default=0,
    metavar="N",
    help="run N competing CPU-bound processes during the benchmark (a shared machine, "
    "reproducibly)",
  )
  parser.add_argument("--seed", type=int, default=0, help="inputs and weights")
  parser.add_argument("--json", metavar="OUT", help="also write every figure to this file")
  g = parser.add_argument_group("zero_shot")
  g.add_argument("--num-masks", type=int, default=32)
  g.add_argument(
    "--mask-batch-size",
    type=int,
    default=None,
    help="JAX: masks reconstructed together (zero_shot default None: all at once)",
  )
  g.add_argument(
    "--torch-mask-chunk", type=int, default=0, help="masks per forward pass (0 = all at once)"
  )
  g = parser.add_argument_group("finetune, patchcore, anomalydino")
  g.add_argument(
    "--shots",
    type=int,
    default=1,
    help="normal images: repeated into the batch (finetune), the bank's images (patchcore, "
    "anomalydino)",
  )
  g.add_argument("--rank", type=int, default=32, help="LoRA rank")
  g.add_argument(
    "--iterations", type=int, default=50, help="steps of the fine-tune whose time is projected"
  )
  g.add_argument(
    "--lora-compute",
    choices=["activations", "weights"],
    default="activations",
    help="JAX: few_shot's lora.compute (PyTorch always works on the activations)",
  )
  g = parser.add_argument_group("patchcore")
  g.add_argument(
    "--coreset-ratio", type=float, default=0.1, help="share of the embeddings the bank keeps"
  )
  g = parser.add_argument_group("patchcore, anomalydino")
  g.add_argument(
    "--torch-model",
    "--torch-patchcore",
    choices=["auto", "anomalib", "plain"],
    default="auto",
    help="PyTorch side: anomalib's model (auto: when importable and it knows the backbone) "
    "or the same computation in plain PyTorch",
  )
  g = parser.add_argument_group("anomalydino")
  g.add_argument(
    "--image-size",
    type=int,
    default=benchmark_anomalydino.DEFAULT_IMAGE_SIZE,
    help="square input, a multiple of the DINOv2's 14-px patches",
  )
  g = parser.add_argument_group("sides")
  g.add_argument("--no-jax", action="store_true", help="PyTorch only")
  g.add_argument("--no-torch", action="store_true", help="JAX only")
  g.add_argument(
    "--torch-python",
    help="interpreter with torch + timm (patchcore: torch, and anomalib if available; "
    "default: this one, if it has them)",
  )
  g.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu")
  g.add_argument("--torch-attention", choices=["both", "fused", "unfused"], default="both")
  g.add_argument("--torch-threads", type=int, default=0, help="0 = every usable CPU")
  g.add_argument(
    "--torch-same-malloc",
    action="store_true",
    help="give PyTorch the malloc tunables the JAX side runs with (maeday_jax.cpu_memory); "
    "by default the worker runs without them, as PyTorch does out of the box",
  )
  parser.add_argument(
    "--interleave",
    action="store_true",
    help="alternate single JAX and PyTorch steps (fairer on a shared, noisy machine; both "
    "processes hold their memory at once)",
  )
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--torch-serve", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.arch is None:
    args.arch = DEFAULT_ARCH[args.task]
  if args.arch not in ARCH_TABLES[args.task]:
    parser.error(
      f"--arch {args.arch} is not a {args.task} architecture; choose one of "
      f"{', '.join(sorted(ARCH_TABLES[args.task]))}."
    )
  if args.batch is None:
    args.batch = DEFAULT_BATCH[args.task]
  if min(args.batch, args.num_masks, args.steps, args.shots, args.rank, args.iterations) < 1:
    parser.error("--batch, --num-masks, --steps, --shots, --rank, --iterations must be >= 1.")
  if args.warmup < 0:
    parser.error("--warmup must be >= 0.")
  if not 0.0 <= args.mask_ratio < 1.0:
    parser.error("--mask-ratio must be in [0, 1).")
  if not 0.0 < args.coreset_ratio <= 1.0:
    parser.error("--coreset-ratio must be in (0, 1].")
  if args.task == "patchcore" and benchmark_patchcore.bank_rows(args.shots, args.coreset_ratio) < 1:
    parser.error("--coreset-ratio keeps no embedding of the shots: raise it or --shots.")
  if args.task == "anomalydino" and args.dtype == "bfloat16":
    parser.error(
      "--task anomalydino --dtype bfloat16: maeday_jax's DINOv2 detectors compute in "
      "float32; use --dtype auto or float32."
    )
  patch = ARCH_TABLES[args.task][args.arch].get("patch_size", 1)
  if args.task == "anomalydino" and (args.image_size < patch or args.image_size % patch):
    parser.error(f"--image-size {args.image_size} is not a multiple of the {patch}-px patches.")
  return args


def _torch_python(args) -> str | None:
  """The interpreter for the PyTorch side, or None to skip it."""
  if args.no_torch:
    return None
  python = args.torch_python
  if python and not (shutil.which(python) or os.access(python, os.X_OK)):
    raise SystemExit(f"--torch-python {python}: no such executable.")
  modules = getattr(TASKS[args.task][0], "TORCH_MODULES", None)
  if modules is not None:
    importable, needed = modules_importable(modules), "/".join(modules)
  else:
    importable, needed = torch_importable(), "torch/timm"
  if python is None and importable:
    python = sys.executable
  if python is None:
    log(f"[torch] skipped: {needed} not importable here; pass --torch-python PATH.")
  return python


# The tasks that are whole tools of their own, with their own options (not one side's
# step against the other's): `--task NAME` runs the module's `main` on the other arguments.
OWN_TOOLS = {
  "bulk": "benchmark_bulk",
  "input": "benchmark_input",
  "musc": "benchmark_musc",
  "serve": "benchmark_serve",
  "pmad": "benchmark_pmad",
}


def _own_tool(argv) -> tuple[str, list[str]] | None:
  """The module and the other arguments when one of `OWN_TOOLS` is asked for."""
  argv = list(sys.argv[1:] if argv is None else argv)
  for i, arg in enumerate(argv):
    for task, module in OWN_TOOLS.items():
      if arg == f"--task={task}":
        return module, argv[:i] + argv[i + 1 :]
      if arg == "--task" and argv[i + 1 : i + 2] == [task]:
        return module, argv[:i] + argv[i + 2 :]
  return None


def main(argv=None) -> int:
  own = _own_tool(argv)
  if own is not None:
    module, rest = own
    return importlib.import_module(module).main(rest)
  args = parse_args(argv)
  arch = ARCH_TABLES[args.task][args.arch]
  if args.torch_worker:
    return torch_worker(args, arch)

  task = TASKS[args.task][0]
  hidden = ("torch_worker", "torch_serve", "json")
  result = {
    "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    "config": {k: v for k, v in vars(args).items() if k not in hidden},
    "arch": arch,
    "machine": machine_info(),
    "work": task.describe_work(args, arch),
  }
  python = _torch_python(args)
  with BackgroundLoad(args.background_load):
    if args.interleave and python and not args.no_jax:
      result["jax"], result["pytorch"] = run_interleaved(args, arch, python)
    else:
      result["jax"], result["pytorch"] = run_sequential(args, arch, python)
  result = {k: v for k, v in result.items() if v is not None}

  jx, pt = result.get("jax"), result.get("pytorch")
  if jx and pt:
    result["ratio_jax_over_torch"] = jx["images_per_s"] / pt["images_per_s"]
    result["cpu_time_ratio_torch_over_jax"] = pt["step_cpu_median_s"] / jx["step_cpu_median_s"]
    result.update(task.compare(jx, pt))

  return finish(result, report, args.json)


if __name__ == "__main__":
  if "--torch-worker" not in sys.argv:  # The worker's interpreter has no maeday_jax.
    from maeday_jax import cpu_memory

    # The JAX side runs as the library's commands do (`maeday_jax.cpu_memory`).
    cpu_memory.reexec_with_kept_memory()
  sys.exit(main())

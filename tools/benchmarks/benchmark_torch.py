"""The PyTorch side of `tools/benchmark.py`: `TorchSide`, what both tasks' PyTorch runs share.

It runs the independent reference model (`tools/references/torch_mae_reference.py`) on
the benchmark weights of `benchmark_common`, in the worker subprocess. PyTorch is imported when a
`TorchSide` is built, not when this module is: the task modules define both sides, and
the JAX process imports them without ever building a PyTorch side (PyTorch is optional).
"""

from __future__ import annotations

import os

from benchmark_common import (
  import_reference,
  log,
  machine_info,
  random_state_dict,
  step_stats,
  timed,
)


def torch_device(torch, args):
  """(device, is CUDA) of `--torch-device`, with `--torch-threads` (default: every CPU
  this process may use) set; refuses CUDA when this torch build has none."""
  threads = args.torch_threads or (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  )
  torch.set_num_threads(threads)
  device = torch.device(args.torch_device)
  cuda = device.type == "cuda"
  if cuda and not torch.cuda.is_available():
    raise SystemExit("--torch-device cuda: this torch build sees no CUDA device.")
  return device, cuda


class TorchSide:
  """The PyTorch reference model on the benchmark weights; `step(mode)` times one step.

  `mode` is the attention path of every block: "fused" (`F.scaled_dot_product_attention`)
  or "unfused" (explicit softmax(q k^T) v, what the MAE release ran). Subclasses set up
  their inputs, implement `_run(mode)` (one blocking step) and may add `extra_summary()`.
  """

  def __init__(self, args, arch: dict, flops_per_item: float):
    import torch

    ref = import_reference("torch_mae_reference")

    self.torch, self.args, self.arch = torch, args, arch
    self.flops_per_item = flops_per_item
    self.device, self.cuda = torch_device(torch, args)
    if self.cuda:
      # JAX's default float32 matmul precision on GPUs is TF32; PyTorch's is full float32.
      # Match JAX, or the float32 comparison measures two different arithmetics.
      torch.backends.cuda.matmul.allow_tf32 = True
      torch.backends.cudnn.allow_tf32 = True
    model = ref.build_reference(**arch)
    state = {k: torch.from_numpy(v) for k, v in random_state_dict(arch, args.seed).items()}
    model.load_state_dict(state, strict=True)
    self.model = model.to(self.device).eval()
    self.autocast = lambda: torch.autocast(
      self.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"
    )
    self.modes = ["unfused", "fused"] if args.torch_attention == "both" else [args.torch_attention]
    self.first: dict[str, float] = {}
    self.times: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in self.modes}

  def set_attention(self, mode: str) -> None:
    for blk in list(self.model.blocks) + list(self.model.decoder_blocks):
      blk.attn.fused_attn = mode == "fused"

  def _run(self, mode: str) -> None:
    raise NotImplementedError

  def _blocking_run(self, mode: str) -> None:
    self.set_attention(mode)
    self._run(mode)
    if self.cuda:
      self.torch.cuda.synchronize()

  def prepare(self, mode: str) -> None:
    """First iteration (timed apart: one-time allocations) and the warm-up steps."""
    wall, _ = timed(lambda: self._blocking_run(mode))
    self.first[mode] = wall
    log(f"[torch {mode}] first iteration {wall:.2f} s")
    for i in range(self.args.warmup):
      wall, _ = timed(lambda: self._blocking_run(mode))
      log(f"[torch {mode}] warmup {i + 1}/{self.args.warmup}: {wall:.2f} s")

  def step(self, mode: str) -> tuple[float, float]:
    wall, cpu = timed(lambda: self._blocking_run(mode))
    walls, cpus = self.times[mode]
    walls.append(wall)
    cpus.append(cpu)
    log(f"[torch {mode}] step {len(walls)}/{self.args.steps}: {wall:.2f} s (CPU {cpu:.2f} s)")
    return wall, cpu

  def extra_summary(self) -> dict:
    return {}

  def summary(self) -> dict:
    torch, args = self.torch, self.args
    runs = {
      mode: {
        "first_iteration_s": self.first[mode],
        **step_stats(*self.times[mode], args.batch, self.flops_per_item),
      }
      for mode in self.modes
    }
    best = min(runs, key=lambda k: runs[k]["step_median_s"])
    result = {
      "side": "pytorch",
      "torch": torch.__version__,
      "threads": torch.get_num_threads(),
      "device": args.torch_device,
      "device_name": torch.cuda.get_device_name(self.device) if self.cuda else None,
      "tf32": self.cuda,
      "dtype": "bfloat16" if args.dtype == "bfloat16" else "float32",
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "attention": best,
      "attention_runs": runs,
      **runs[best],
      **self.extra_summary(),
      "machine": machine_info(),
    }
    try:
      import timm

      result["timm"] = timm.__version__
    except ImportError:
      pass
    return result

"""What `--task patchcore` and `--task anomalydino` share: fit a memory bank, then score.

One timed step of either task is a fit (the normal shots through the backbone into a
bank of patch features) followed by the scoring of `--batch` images against that bank.
This module holds the frame around the two methods' own code: the PyTorch and JAX sides'
timing (`TorchBankSide`, `JaxBankSide`: first fit and scoring apart, warm-up steps, then
fit + scoring per step), the agreement check's bookkeeping and the report lines. The task
modules supply the implementations (`TorchBankSide.impl`: `name`, `fit(shots)`,
`score(images) -> (scores, maps)`, `bank_shape`), the inputs and their check.

Like the other task modules it imports neither JAX nor PyTorch at import time: the
PyTorch worker imports it without JAX, the JAX process without PyTorch.
"""

from __future__ import annotations

import os
import statistics

import numpy as np
from benchmark_common import (
  agreement,
  inputs_warning,
  jax_header,
  log,
  machine_info,
  peak_rss_bytes,
  step_stats,
  timed,
)
from benchmark_jax import JaxSide
from benchmark_torch import TorchSide, torch_device

# The worker's single PyTorch run (no attention paths to choose between), and the modules
# the default `--torch-python` (this interpreter) must have for the worker.
TORCH_MODES = ("eager",)
TORCH_MODULES = ("torch",)
# anomalib's `AnomalyMapGenerator` (PatchCore's, which AnomalyDINO reuses): the patch
# scores upsampled (nearest) to the image, then blurred by a Gaussian of sigma 4, 33 taps.
BLUR_SIGMA = 4.0
BLUR_SIZE = 2 * int(4.0 * BLUR_SIGMA + 0.5) + 1


def fit_stats(wall: list[float], cpu: list[float]) -> dict:
  """Median-based figures of the timed fits."""
  return {
    "fit_times_s": wall,
    "fit_cpu_times_s": cpu,
    "fit_median_s": statistics.median(wall),
    "fit_min_s": min(wall),
    "fit_cpu_median_s": statistics.median(cpu),
  }


def compare(jx: dict, pt: dict) -> dict:
  """How closely the sides' check scores agree, and the fit time ratio."""
  return {
    **agreement(jx, pt, "check_scores", "score_max_rel_diff"),
    "fit_ratio_jax_over_torch": pt["fit_median_s"] / jx["fit_median_s"],
  }


def seeded_images(shots: int, batch: int, size: int, *stream: int):
  """Seeded shots (K, S, S, 3) and test images (B, S, S, 3) ~ N(0, 1), in normalised
  space, the same in every process for one `stream` of seeds."""
  rng = np.random.default_rng(list(stream))
  train = rng.standard_normal((shots, size, size, 3), dtype=np.float32)
  test = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  return train, test


def nchw(torch, images: np.ndarray, device):
  """(B, H, W, C) NumPy -> (B, C, H, W) torch tensor on `device`."""
  return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous().to(device)


# ----------------------------------------------------------------------------------------
# PyTorch side (the worker subprocess: no JAX, no maeday_jax).
# ----------------------------------------------------------------------------------------


def blurred_map(torch, patch_scores, size: tuple[int, int]):
  """anomalib's `AnomalyMapGenerator` in plain PyTorch: (B, 1, h, w) patch scores ->
  (B, 1, H, W), nearest-neighbour upsampling, then the normalised 33 x 33 Gaussian (kornia's
  taps) with reflected borders."""
  F = torch.nn.functional
  x = torch.arange(BLUR_SIZE, dtype=torch.float32) - BLUR_SIZE // 2
  taps = torch.exp(-x.pow(2.0) / (2 * BLUR_SIGMA**2))
  taps = taps / taps.sum()
  kernel = torch.outer(taps, taps)[None, None].to(patch_scores.device)
  maps = F.interpolate(patch_scores, size=size)
  radius = BLUR_SIZE // 2
  return F.conv2d(F.pad(maps, (radius, radius, radius, radius), mode="reflect"), kernel)


def choose_implementation(args, method: str, anomalib_archs, anomalib, plain):
  """The PyTorch model of `method`: anomalib's when `--torch-model` and the environment
  allow (auto: anomalib importable and `--arch` among `anomalib_archs`), else the same
  computation in plain PyTorch; `anomalib()` and `plain()` build them."""
  choice, name = args.torch_model, args.arch
  if choice != "plain" and name in anomalib_archs:
    try:
      return anomalib()
    except ImportError as e:
      if choice == "anomalib":
        raise SystemExit(f"--torch-model anomalib: anomalib is not importable ({e}).") from e
      log(f"[torch] anomalib's {method} unavailable ({e}): plain PyTorch instead.")
  elif choice == "anomalib":
    raise SystemExit(f"--torch-model anomalib: anomalib has no {method} on {name!r}.")
  return plain()


class TorchBankSide(TorchSide):
  """Fit and scoring in PyTorch, timed apart; the subclass builds `impl` and the inputs.

  `TorchSide`'s constructor builds the MAE reference; this one only sets up threads, the
  device and the bookkeeping. The subclass then sets `impl`, `shots` and `images` (device
  tensors), `digest` (of its NumPy inputs and weights) and `flops_per_item`, and
  implements `_check()`.
  """

  def __init__(self, args):
    import torch

    self.torch, self.args = torch, args
    self.device, self.cuda = torch_device(torch, args)
    self.autocast = lambda: torch.autocast(
      self.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"
    )
    self.modes = list(TORCH_MODES)
    self.first: dict[str, float] = {}
    self.times = {m: ([], []) for m in self.modes}
    self.fit_wall: list[float] = []
    self.fit_cpu: list[float] = []
    self.scores = None
    self.check_bank_shape: tuple[int, ...] = ()

  def set_attention(self, mode: str) -> None:
    """One eager run: nothing to choose."""

  def _sync(self) -> None:
    if self.cuda:
      self.torch.cuda.synchronize()

  def _fit(self) -> None:
    self.impl.fit(self.shots)
    self._sync()

  def _score(self) -> None:
    with self.torch.inference_mode():
      self.scores, _ = self.impl.score(self.images)
    self._sync()

  def _check(self) -> list[float]:
    """The agreement check's image scores (and `check_bank_shape`); leaves the timed bank."""
    raise NotImplementedError

  def prepare(self, mode: str) -> None:
    """First fit and scoring (timed apart: one-time allocations), the warm-up steps, the
    check."""
    self.first_fit_s, _ = timed(self._fit)
    wall, _ = timed(self._score)
    self.first[mode] = wall
    log(f"[torch] first fit {self.first_fit_s:.2f} s, first scoring {wall:.2f} s")
    for i in range(self.args.warmup):
      fit_wall, _ = timed(self._fit)
      wall, _ = timed(self._score)
      log(f"[torch] warmup {i + 1}/{self.args.warmup}: fit {fit_wall:.2f} s, scoring {wall:.2f} s")
    self.check_scores = self._check()
    log(f"[torch] check scores {self.check_scores}")

  def step(self, mode: str) -> tuple[float, float]:
    fit_wall, fit_cpu = timed(self._fit)
    wall, cpu = timed(self._score)
    self.fit_wall.append(fit_wall)
    self.fit_cpu.append(fit_cpu)
    walls, cpus = self.times[mode]
    walls.append(wall)
    cpus.append(cpu)
    log(
      f"[torch] step {len(walls)}/{self.args.steps}: fit {fit_wall:.2f} s (CPU {fit_cpu:.2f} s), "
      f"scoring {wall:.2f} s (CPU {cpu:.2f} s)"
    )
    return fit_wall + wall, fit_cpu + cpu

  def summary(self) -> dict:
    torch = self.torch
    mode = self.modes[0]
    result = {
      "side": "pytorch",
      "torch": torch.__version__,
      "implementation": self.impl.name,
      "threads": torch.get_num_threads(),
      "device": self.args.torch_device,
      "device_name": torch.cuda.get_device_name(self.device) if self.cuda else None,
      "tf32": "convolutions" if self.cuda else False,
      "dtype": "bfloat16" if self.args.dtype == "bfloat16" else "float32",
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      "first_fit_s": self.first_fit_s,
      "first_iteration_s": self.first[mode],
      **fit_stats(self.fit_wall, self.fit_cpu),
      **step_stats(*self.times[mode], self.args.batch, self.flops_per_item),
      "bank_shape": list(self.impl.bank_shape),
      "check_bank_shape": list(self.check_bank_shape),
      "check_scores": self.check_scores,
      "scores": self.scores.float().cpu().numpy().reshape(-1).tolist(),
      "inputs_digest": self.digest,
      "peak_rss_bytes": peak_rss_bytes(),
      "machine": machine_info(),
    }
    if self.cuda:
      result["device_peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
    return result


# ----------------------------------------------------------------------------------------
# JAX side.
# ----------------------------------------------------------------------------------------


class JaxBankSide(JaxSide):
  """Fit and scoring in JAX, timed apart; the subclass builds the model and the inputs.

  `JaxSide`'s constructor builds the MAE; this one only sets up the bookkeeping. The
  subclass implements `_fit()` (a blocking fit into `self.bank`), `_run()` (a blocking
  scoring step setting `self.scores`), `_check()` and `bank_shape`, sets `digest`, times
  its first fit with `first_fit()` (before it compiles the scoring step for that bank's
  shape) and calls `start()` once everything is built.
  """

  def __init__(self, args, flops_per_item: float):
    import jax

    self.jax, self.args = jax, args
    self.flops_per_item = flops_per_item
    self.compile_times: dict[str, float] = {}
    self.wall, self.cpu, self.fit_wall, self.fit_cpu = [], [], [], []
    self.bank = self.scores = None

  @property
  def bank_shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  def _fit(self) -> None:
    raise NotImplementedError

  def _check(self) -> tuple[list[float], tuple[int, ...]]:
    """(image scores, bank shape) of the agreement check; leaves the timed bank."""
    raise NotImplementedError

  def first_fit(self) -> None:
    """The first fit, its compilation included, timed apart."""
    self.first_fit_s, _ = timed(self._fit)
    log(f"[jax] first fit (compilation and one-time set-up included) {self.first_fit_s:.2f} s")

  def start(self) -> None:
    """The first scoring (with its compilation), the warm-up steps, the check."""
    wall, _ = timed(self._run)
    self.compile_times["first_run_s"] = wall
    scorer = ("lower_s", "compile_s", "first_run_s")
    self.compile_times["first_call_s"] = sum(self.compile_times.get(k, 0.0) for k in scorer)
    log(f"[jax] first scoring {wall:.2f} s")
    for i in range(self.args.warmup):
      fit_wall, _ = timed(self._fit)
      wall, _ = timed(self._run)
      log(f"[jax] warmup {i + 1}/{self.args.warmup}: fit {fit_wall:.2f} s, scoring {wall:.2f} s")
    self.check_scores, self.check_bank_shape = self._check()
    log(f"[jax] check scores {self.check_scores}")

  def step(self) -> tuple[float, float]:
    fit_wall, fit_cpu = timed(self._fit)
    wall, cpu = timed(self._run)
    self.fit_wall.append(fit_wall)
    self.fit_cpu.append(fit_cpu)
    self.wall.append(wall)
    self.cpu.append(cpu)
    log(
      f"[jax] step {len(self.wall)}/{self.args.steps}: fit {fit_wall:.2f} s (CPU {fit_cpu:.2f} s), "
      f"scoring {wall:.2f} s (CPU {cpu:.2f} s)"
    )
    return fit_wall + wall, fit_cpu + cpu

  def extra_summary(self) -> dict:
    out = {
      "first_fit_s": self.first_fit_s,
      **fit_stats(self.fit_wall, self.fit_cpu),
      "bank_shape": list(self.bank_shape),
      "check_bank_shape": list(self.check_bank_shape),
      "check_scores": self.check_scores,
      "scores": np.asarray(self.scores, np.float64).reshape(-1).tolist(),
      "inputs_digest": self.digest,
      "peak_rss_bytes": peak_rss_bytes(),
    }
    stats = [d.memory_stats() for d in self.jax.local_devices()]
    if all(stats):
      out["device_peak_bytes"] = [int(s.get("peak_bytes_in_use", 0)) for s in stats]
      out["device_limit_bytes"] = [int(s.get("bytes_limit", 0)) for s in stats]
    return out


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
  return "?" if n is None else f"{n / 2**20:,.0f} MiB"


def side_lines(run: dict, work: dict) -> list[str]:
  """Fit, scoring and memory of one side."""
  fit_flops = work["per_fit"] / run["fit_median_s"] / 1e9
  rows, dim = run["bank_shape"]
  memory = f"peak RSS {_mib(run.get('peak_rss_bytes'))}"
  if "device_peak_bytes" in run:
    peaks = run["device_peak_bytes"]
    peaks = peaks if isinstance(peaks, list) else [peaks]
    memory += ", device peak " + " / ".join(_mib(p) for p in peaks)
  return [
    f"  fit: {run['fit_median_s']:.3f} s (median; min {run['fit_min_s']:.3f}; CPU "
    f"{run['fit_cpu_median_s']:.3g} s), {fit_flops:.1f} GFLOP/s; first fit "
    f"{run['first_fit_s']:.2f} s; bank {rows} x {dim}",
    f"  scoring: {run['step_median_s']:.3f} s per batch (median; min {run['step_min_s']:.3f})"
    f" -> {run['images_per_s']:.3f} images/s ({1 / run['images_per_s']:.4g} s/image), "
    f"{run['gflops_per_s']:.1f} GFLOP/s; CPU {run['step_cpu_median_s']:.3g} s/batch",
    f"  memory: {memory}",
  ]


def report_lines(result: dict, work_lines: list[str], jax_how: str, check_words: str) -> list[str]:
  """The printed summary after the task's own lines (`work_lines`): each side, the
  ratios, and the check (`check_words` says what it scored)."""
  work = result["work"]
  jx, pt = result.get("jax"), result.get("pytorch")
  lines = list(work_lines)
  if jx:
    lines += [
      jax_header(jx) + f", {jax_how}",
      *side_lines(jx, work),
      f"  compile (scoring): trace+lower {jx['lower_s']:.2f} s + compile {jx['compile_s']:.2f}"
      f" s; first call incl. compile {jx['first_call_s']:.2f} s; the first fit (compilation "
      f"included) is the one above",
    ]
  if pt:
    dev = pt["device"] + (f" ({pt['device_name']})" if pt.get("device_name") else "")
    lines += [
      f"PyTorch {pt['torch']} on {dev}, {pt['threads']} threads, {pt['dtype']}: "
      f"{pt['implementation']}",
      *side_lines(pt, work),
      f"  first scoring {pt['first_iteration_s']:.2f} s",
    ]
  if "ratio_jax_over_torch" in result:
    fit, scoring = result["fit_ratio_jax_over_torch"], result["ratio_jax_over_torch"]
    lines.append(
      f"ratio JAX / PyTorch (speed): fit {fit:.3f} ({'JAX' if fit >= 1 else 'PyTorch'} "
      f"faster), scoring {scoring:.3f} ({'JAX' if scoring >= 1 else 'PyTorch'} faster); CPU "
      f"seconds per scoring batch PyTorch / JAX: {result['cpu_time_ratio_torch_over_jax']:.3f}"
    )
  if "score_max_rel_diff" in result:
    rows, dim = jx["check_bank_shape"]
    lines.append(
      f"check ({check_words}; bank of {rows} x {dim}): image scores JAX vs PyTorch max "
      f"relative difference {result['score_max_rel_diff']:.2e}" + inputs_warning(result)
    )
  return lines

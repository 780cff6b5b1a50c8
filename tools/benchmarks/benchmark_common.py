"""What both sides of `tools/benchmark.py` share: the work, the weights, the timing.

The architectures (`ARCHS`), the analytic FLOP counts, the seeded inputs and random
weights both sides load, the timing and machine figures, the worker's result protocol
(`emit`, `TorchProcess`) and the report lines. NumPy and the standard library only: the
PyTorch worker imports this, and it must import neither JAX nor `maeday_jax`. The sides
themselves are `benchmark_jax.JaxSide` and `benchmark_torch.TorchSide`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

# This file lives in tools/benchmarks/; the entry point `tools/benchmark.py` (which the
# PyTorch worker runs too) one folder up, the PyTorch reference models in
# tools/references/.
TOOLS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_ROOT = os.path.dirname(TOOLS_DIR)
BENCHMARK_SCRIPT = os.path.join(TOOLS_DIR, "benchmark.py")
REFERENCES_DIR = os.path.join(TOOLS_DIR, "references")
# What every task's PyTorch worker needs from the command line; each task's `WORKER_ARGS`
# adds its own options.
SIDE_ARGS = ("arch", "batch", "steps", "warmup", "dtype", "seed", "torch_device", "torch_threads")
# The worker's single JSON result line starts with this, so that library chatter on
# stdout cannot be mistaken for it.
RESULT_PREFIX = "MAEDAY_BENCHMARK_RESULT "
# The prefix of glibc's malloc tunables, which the JAX side runs with
# (`maeday_jax.cpu_memory`; this module must not import maeday_jax).
MALLOC_TUNABLES = "glibc.malloc."

# The architectures of `maeday_jax.models.VARIANTS`, spelled out here because the PyTorch
# worker must not import `maeday_jax`; the JAX side checks that the two agree.
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)
ARCHS: dict[str, dict[str, int]] = {
  "base": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, **_DECODER),
  "large": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_DECODER),
  "huge": dict(img_size=224, patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_DECODER),
  "small": dict(
    img_size=224,
    patch_size=16,
    embed_dim=256,
    depth=6,
    num_heads=4,
    decoder_embed_dim=128,
    decoder_depth=2,
    decoder_num_heads=4,
  ),
  "test": dict(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=2,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
  ),
}
MLP_RATIO = 4


# ----------------------------------------------------------------------------------------
# Work description shared by both sides (NumPy only).
# ----------------------------------------------------------------------------------------


def num_patches(arch: dict) -> int:
  return (arch["img_size"] // arch["patch_size"]) ** 2


def num_visible(arch: dict, mask_ratio: float) -> int:
  """`int(L * (1 - ratio))` visible patches, as the official `random_masking`."""
  return int(num_patches(arch) * (1 - mask_ratio))


def block_flops(tokens: int, width: int, mlp_ratio: int = MLP_RATIO) -> dict[str, int]:
  """Matmul FLOPs (2 per multiply-add) of one pre-norm transformer block on `tokens`."""
  t, d, h = tokens, width, mlp_ratio * width
  return {
    "qkv": 2 * t * d * 3 * d,
    "attn_scores": 2 * t * t * d,  # q k^T over all heads: heads * T * T * head_dim MACs
    "attn_values": 2 * t * t * d,
    "proj": 2 * t * d * d,
    "fc1": 2 * t * d * h,
    "fc2": 2 * t * h * d,
  }


def flops_per_mask(arch: dict, mask_ratio: float = 0.75) -> dict[str, int]:
  """Analytic FLOPs of one MAE reconstruction (one image, one mask).

  Counted: every matmul, as 2 FLOPs per multiply-add, with the token counts the official
  model (and this port) really compute with. The patch embedding runs on all L patches
  (masking comes after it); the encoder sees K visible patches + cls; `decoder_embed`
  maps those K + 1 tokens; the decoder and `decoder_pred` run on L + 1 tokens (the cls
  prediction is dropped afterwards). Not counted: LayerNorm, softmax, GELU, biases, the
  masking gathers, the error map and blur (together well under 1 % for ViT-B).
  """
  d, dd, p = arch["embed_dim"], arch["decoder_embed_dim"], arch["patch_size"]
  length = num_patches(arch)
  enc_tokens = num_visible(arch, mask_ratio) + 1
  dec_tokens = length + 1
  patch_dim = p * p * 3
  encoder_block = sum(block_flops(enc_tokens, d).values())
  decoder_block = sum(block_flops(dec_tokens, dd).values())
  parts = {
    "patch_embed": 2 * length * patch_dim * d,
    "encoder_blocks": arch["depth"] * encoder_block,
    "decoder_embed": 2 * enc_tokens * d * dd,
    "decoder_blocks": arch["decoder_depth"] * decoder_block,
    "decoder_pred": 2 * dec_tokens * dd * patch_dim,
  }
  parts["total"] = sum(parts.values())
  return parts


def make_inputs(arch: dict, batch: int, num_masks: int, seed: int):
  """Seeded images (B, H, W, 3) ~ N(0, 1) (normalised pixel space) and noise (B, N, L)."""
  rng = np.random.default_rng([seed, 1])
  size = arch["img_size"]
  images = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
  noise = rng.random((batch, num_masks, num_patches(arch)), dtype=np.float32)
  return images, noise


def _sincos_2d(width: int, grid: int) -> np.ndarray:
  """Official fixed 2-D sin-cos table with the zero cls row: (1 + grid**2, width)."""
  omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width / 4.0))

  def one_axis(pos):
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  coords = np.arange(grid, dtype=np.float64)
  w, h = np.meshgrid(coords, coords)  # official order: the column coordinate goes first
  table = np.concatenate([one_axis(w), one_axis(h)], axis=1)
  return np.concatenate([np.zeros((1, width)), table], axis=0).astype(np.float32)


def random_state_dict(arch: dict, seed: int) -> dict[str, np.ndarray]:
  """Random weights in the official MAE state-dict layout (PyTorch shapes), NumPy only.

  Both sides load these, so their outputs can be compared. Scales keep activations of
  order one (weights ~ N(0, 1/fan_in), LayerNorm scales near 1): zeros or huge values
  could hit fast or slow paths (e.g. denormals) that real checkpoints do not.
  """
  rng = np.random.default_rng([seed, 2])
  d, dd, p = arch["embed_dim"], arch["decoder_embed_dim"], arch["patch_size"]
  grid = arch["img_size"] // p
  state: dict[str, np.ndarray] = {}

  def normal(shape, std):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)

  def uniform(shape, low, high):
    return rng.uniform(low, high, size=shape).astype(np.float32)

  def linear(name, fan_out, fan_in):
    state[f"{name}.weight"] = normal((fan_out, fan_in), fan_in**-0.5)
    state[f"{name}.bias"] = uniform((fan_out,), -0.1, 0.1)

  def norm(name, width):
    state[f"{name}.weight"] = uniform((width,), 0.8, 1.2)
    state[f"{name}.bias"] = uniform((width,), -0.1, 0.1)

  def blocks(prefix, count, width):
    for i in range(count):
      b = f"{prefix}.{i}"
      norm(f"{b}.norm1", width)
      linear(f"{b}.attn.qkv", 3 * width, width)
      linear(f"{b}.attn.proj", width, width)
      norm(f"{b}.norm2", width)
      linear(f"{b}.mlp.fc1", MLP_RATIO * width, width)
      linear(f"{b}.mlp.fc2", width, MLP_RATIO * width)

  state["cls_token"] = normal((1, 1, d), 0.5)
  state["pos_embed"] = _sincos_2d(d, grid)[None]
  state["patch_embed.proj.weight"] = normal((d, 3, p, p), (3 * p * p) ** -0.5)
  state["patch_embed.proj.bias"] = uniform((d,), -0.1, 0.1)
  blocks("blocks", arch["depth"], d)
  norm("norm", d)
  linear("decoder_embed", dd, d)
  state["mask_token"] = normal((1, 1, dd), 0.5)
  state["decoder_pos_embed"] = _sincos_2d(dd, grid)[None]
  blocks("decoder_blocks", arch["decoder_depth"], dd)
  norm("decoder_norm", dd)
  linear("decoder_pred", p * p * 3, dd)
  return state


def arrays_digest(*arrays: np.ndarray) -> str:
  """Short hash of any number of arrays: each side reports that of its inputs (and
  weights), which proves both processes generated the same ones."""
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def max_rel_diff(a, b) -> float:
  """Largest |a - b| / |b| over the elements (b is the PyTorch side's values)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def agreement(jx: dict, pt: dict, values: str, name: str) -> dict:
  """How closely the sides' `values` (a result key) agree, as `name`, and whether they
  worked on the same inputs (`same_inputs`; see `inputs_warning`)."""
  return {
    name: max_rel_diff(jx[values], pt[values]),
    "same_inputs": jx["inputs_digest"] == pt["inputs_digest"],
  }


def timed(run) -> tuple[float, float]:
  """Wall-clock and process CPU seconds of one call of `run` (which must block)."""
  w0, c0 = time.perf_counter(), time.process_time()
  run()
  return time.perf_counter() - w0, time.process_time() - c0


def step_stats(wall: list[float], cpu: list[float], batch: int, flops_per_image: float) -> dict:
  """Median-based throughput figures of the timed steps.

  The process CPU time is kept because the wall time of a step on a shared machine
  depends on what else runs; CPU seconds per step much below wall seconds x threads
  means the process did not get its cores (spin-waiting threads count as busy).
  """
  median = statistics.median(wall)
  return {
    "step_times_s": wall,
    "step_cpu_times_s": cpu,
    "step_median_s": median,
    "step_min_s": min(wall),
    "step_cpu_median_s": statistics.median(cpu),
    "images_per_s": batch / median,
    "gflops_per_s": batch * flops_per_image / median / 1e9,
  }


def machine_info() -> dict:
  """CPU model, cores, load: enough to tell later which machine a figure came from."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  info = {
    "cpu_model": cpu,
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "platform": platform.platform(),
    "numpy": np.__version__,
  }
  if hasattr(os, "sched_getaffinity"):
    info["cpus_usable"] = len(os.sched_getaffinity(0))
  if hasattr(os, "getloadavg"):
    info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
  return info


class BackgroundLoad:
  """`count` competing CPU-bound processes (a Python busy loop each) while in the block.

  Makes "the machine is shared" reproducible: `--background-load 1` on a 2-core machine
  leaves the benchmarked sides one core's worth of CPU between them and the load.
  """

  def __init__(self, count: int):
    self.count, self.processes = count, []

  def __enter__(self):
    import subprocess

    for _ in range(self.count):
      self.processes.append(
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
      )
    if self.count:
      log(f"[load] started {self.count} busy-loop process(es)")
    return self

  def __exit__(self, *exc):
    for process in self.processes:
      process.kill()
      process.wait()
    return False


def log(msg: str) -> None:
  # Progress goes to stderr: stdout of the worker carries the result lines.
  print(msg, file=sys.stderr, flush=True)


def peak_memory() -> dict:
  """This process's peak resident memory, and the first device's peak where JAX reports
  one (imports JAX: for the JAX-side tasks only)."""
  import resource

  import jax

  peak = {"host_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak["device_peak_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return peak


def finish(result: dict, report, path: str | None) -> int:
  """Adds the load average at the end, prints `report(result)`, writes the JSON; 0."""
  if hasattr(os, "getloadavg"):
    result["load_average_end_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
  print(report(result), flush=True)
  write_json(result, path)
  return 0


def write_json(result: dict, path: str | None) -> None:
  """Writes a benchmark's figures to `path` (its folder made), when one is given."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")


def emit(payload: dict) -> None:
  print(RESULT_PREFIX + json.dumps(payload), flush=True)


def import_reference(name: str):
  """The PyTorch reference module `name` of tools/references/ (`torch_mae_reference`,
  `torch_resnet_reference`): the independent models the PyTorch sides run."""
  if REFERENCES_DIR not in sys.path:
    sys.path.insert(0, REFERENCES_DIR)
  return importlib.import_module(name)


def use_checkout() -> None:
  """Makes `maeday_jax` and `configs` importable from this checkout, installed or not (the
  JAX-only tools; never the PyTorch worker)."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def torch_importable() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "timm", "safetensors"))


def torch_environment(environ, same_malloc: bool) -> dict[str, str]:
  """The PyTorch worker's environment: this one, less the malloc tunables that the JAX
  side runs with (`maeday_jax.cpu_memory`), so that PyTorch runs as it does by default,
  unless `same_malloc` (`--torch-same-malloc`) keeps them."""
  env = dict(environ)
  if same_malloc:
    return env
  kept = [t for t in env.pop("GLIBC_TUNABLES", "").split(":") if t]
  kept = [t for t in kept if not t.startswith(MALLOC_TUNABLES)]
  if kept:
    env["GLIBC_TUNABLES"] = ":".join(kept)
  return env


class TorchProcess:
  """`benchmark.py --torch-worker` under another interpreter, read line by line.

  `forward` lists the argument names (attributes of `args`) the worker needs.
  """

  def __init__(self, args, python: str, serve: bool, forward: tuple[str, ...]):
    flags = []
    for name in forward:
      flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    cmd = [python, BENCHMARK_SCRIPT, "--torch-worker", *flags]
    if serve:
      cmd.append("--torch-serve")
    log(f"[torch] {' '.join(cmd)}")
    # stderr (progress) goes straight through; stdout carries the result lines.
    self.proc = subprocess.Popen(
      cmd,
      stdin=subprocess.PIPE if serve else subprocess.DEVNULL,
      stdout=subprocess.PIPE,
      text=True,
      env=torch_environment(os.environ, getattr(args, "torch_same_malloc", False)),
    )
    self.chatter: list[str] = []

  def read(self) -> dict:
    """The next result line of the worker."""
    for line in self.proc.stdout:
      if line.startswith(RESULT_PREFIX):
        return json.loads(line[len(RESULT_PREFIX) :])
      self.chatter.append(line)
    code = self.proc.wait()
    tail = "".join(self.chatter[-20:])
    raise RuntimeError(f"PyTorch worker ended (exit {code}) without a result; stdout:\n{tail}")

  def command(self, text: str) -> dict | None:
    self.proc.stdin.write(text + "\n")
    self.proc.stdin.flush()
    return None if text == "done" else self.read()

  def finish(self) -> dict:
    result = self.read()
    if self.proc.stdin:
      self.proc.stdin.close()
    self.proc.wait()
    return result


# ----------------------------------------------------------------------------------------
# Report lines shared by the tasks.
# ----------------------------------------------------------------------------------------


PLURALS = {"copy": "copies"}


def timing_words(cfg: dict) -> str:
  return f"{cfg['steps']} timed steps after {cfg['warmup']} warm-up" + (
    ", sides interleaved step by step" if cfg["interleave"] else ""
  )


def _tunables(side: dict) -> str:
  return f", GLIBC_TUNABLES={side['glibc_tunables']}" if side.get("glibc_tunables") else ""


def jax_header(jx: dict) -> str:
  return (
    f"JAX {jx['jax']} (jaxlib {jx['jaxlib']}, flax {jx['flax']}) on {jx['devices']}, "
    f"{jx.get('dtype', '?')}{_tunables(jx)}"
  ) + (f", XLA_FLAGS={jx['xla_flags']!r}" if jx["xla_flags"] else "")


def torch_header(pt: dict, how: str) -> str:
  dev = pt["device"] + (f" ({pt['device_name']})" if pt.get("device_name") else "")
  return (
    f"PyTorch {pt['torch']} (timm {pt.get('timm', '?')}) on {dev}, {pt['threads']} threads"
    f"{_tunables(pt)}, "
    f"{how}, {pt['attention']} attention (the faster of {'/'.join(pt['attention_runs'])})"
  )


def run_line(label: str, run: dict, unit: str) -> str:
  """One side's step statistics; `unit` names what `images_per_s` counts."""
  first = ""
  if "first_iteration_s" in run:
    first = f"; first iteration {run['first_iteration_s']:.2f} s"
  return (
    f"  {label + ': ' if label else ''}step {run['step_median_s']:.3f} s (median; min "
    f"{run['step_min_s']:.3f}) -> {run['images_per_s']:.3f} {PLURALS.get(unit, unit + 's')}/s "
    f"({1 / run['images_per_s']:.4g} s/{unit}), {run['gflops_per_s']:.1f} GFLOP/s; "
    f"CPU {run['step_cpu_median_s']:.3g} s/step{first}"
  )


def compile_line(jx: dict) -> str:
  return (
    f"  compile: trace+lower {jx['lower_s']:.2f} s + compile {jx['compile_s']:.2f} s; "
    f"first call incl. compile {jx['first_call_s']:.2f} s"
  )


def inputs_warning(result: dict) -> str:
  """Appended to a task's agreement line: empty unless the sides' inputs differed."""
  return "" if result["same_inputs"] else " (WARNING: the inputs differ between the sides)"


def ratio_line(result: dict) -> str:
  r = result["ratio_jax_over_torch"]
  return (
    f"ratio JAX / PyTorch (throughput): {r:.3f} ({'JAX' if r >= 1 else 'PyTorch'} faster); "
    f"CPU seconds per step PyTorch / JAX: {result['cpu_time_ratio_torch_over_jax']:.3f}"
  )


# ----------------------------------------------------------------------------------------
# ResNet backbones (`--task patchcore`), NumPy only.
# ----------------------------------------------------------------------------------------

# The torchvision-layout ResNets PatchCore runs on, spelled out here for the same reason
# as `ARCHS`; they equal `maeday_jax.backbones.VARIANTS` (the JAX side checks) and the
# fields of `torch_resnet_reference.ResNet`. `test_wide` is the tiny wide bottleneck
# model of the tests.
RESNET_ARCHS: dict[str, dict] = {
  "wide_resnet50_2": dict(block="bottleneck", layers=(3, 4, 6, 3), width=64, width_per_group=128),
  "resnet18": dict(block="basic", layers=(2, 2, 2, 2), width=64, width_per_group=64),
  "test_wide": dict(block="bottleneck", layers=(1, 2, 1, 1), width=4, width_per_group=8),
}
RESNET_EXPANSION = {"basic": 1, "bottleneck": 4}
RESNET_NUM_CLASSES = 1000


def resnet_stage_channels(arch: dict, layer: int) -> int:
  """Output channels of `layer{layer}` (1 .. 4), e.g. 512 for wide_resnet50_2's layer2."""
  return arch["width"] * 2 ** (layer - 1) * RESNET_EXPANSION[arch["block"]]


def random_resnet_state_dict(arch: dict, seed: int) -> dict[str, np.ndarray]:
  """Random weights in torchvision's ResNet state-dict layout (PyTorch shapes), NumPy only.

  Keys and shapes are torchvision's (`conv1.weight`, `bn1.running_mean`,
  `layer2.0.downsample.0.weight`, ..., `fc.bias`), in its module order, so both sides load
  the same dict: conv weights OIHW ~ N(0, 2 / fan_out) (torchvision's kaiming-normal),
  BatchNorm running mean ~ N(0, 0.1), variance ~ U(0.5, 1.5), weight ~ U(0.5, 1.5) and
  bias ~ N(0, 0.1) (the last BatchNorm of every residual branch gets weight ~ U(0.1, 0.3),
  so the residual sums stay of order one through the deep stages), and the classifier
  uniform in +-1/sqrt(fan_in). Every statistic is non-trivial, so a mix-up of mean and
  variance or of the affine parameters shows.
  """
  rng = np.random.default_rng([seed, 6])
  block, width = arch["block"], arch["width"]
  state: dict[str, np.ndarray] = {}

  def conv(name, cout, cin, k):
    std = np.sqrt(2.0 / (cout * k * k))
    state[f"{name}.weight"] = (rng.standard_normal((cout, cin, k, k), np.float32) * std).astype(
      np.float32
    )

  def norm(name, n, scale=(0.5, 1.5)):
    state[f"{name}.weight"] = rng.uniform(*scale, n).astype(np.float32)
    state[f"{name}.bias"] = rng.normal(0.0, 0.1, n).astype(np.float32)
    state[f"{name}.running_mean"] = rng.normal(0.0, 0.1, n).astype(np.float32)
    state[f"{name}.running_var"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
    state[f"{name}.num_batches_tracked"] = np.array(1, np.int64)

  last_scale = (0.1, 0.3)
  conv("conv1", width, 3, 7)
  norm("bn1", width)
  inplanes = width
  for k, blocks in enumerate(arch["layers"]):
    planes = width * 2**k
    inner = arch["width_per_group"] * 2**k
    out = planes * RESNET_EXPANSION[block]
    for i in range(blocks):
      b = f"layer{k + 1}.{i}"
      stride = 2 if k > 0 and i == 0 else 1
      if block == "basic":
        conv(f"{b}.conv1", planes, inplanes, 3)
        norm(f"{b}.bn1", planes)
        conv(f"{b}.conv2", planes, planes, 3)
        norm(f"{b}.bn2", planes, last_scale)
      else:
        conv(f"{b}.conv1", inner, inplanes, 1)
        norm(f"{b}.bn1", inner)
        conv(f"{b}.conv2", inner, inner, 3)
        norm(f"{b}.bn2", inner)
        conv(f"{b}.conv3", out, inner, 1)
        norm(f"{b}.bn3", out, last_scale)
      if stride != 1 or inplanes != out:
        conv(f"{b}.downsample.0", out, inplanes, 1)
        norm(f"{b}.downsample.1", out)
      inplanes = out
  bound = 1.0 / np.sqrt(inplanes)
  state["fc.weight"] = rng.uniform(-bound, bound, (RESNET_NUM_CLASSES, inplanes)).astype(np.float32)
  state["fc.bias"] = rng.uniform(-bound, bound, RESNET_NUM_CLASSES).astype(np.float32)
  return state


def peak_rss_bytes() -> int | None:
  """This process's peak resident memory (`getrusage(RUSAGE_SELF).ru_maxrss`), in bytes."""
  try:
    import resource
  except ImportError:  # not on this platform
    return None
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)  # kB on Linux, bytes on macOS


def modules_importable(names) -> bool:
  """Whether every module of `names` can be imported by this interpreter."""
  return all(importlib.util.find_spec(m) is not None for m in names)

"""Zero-shot MAEDAY throughput: the JAX port against the PyTorch reference, same machine.

Both sides do the same work on the same inputs: B images (seeded NumPy, 224 px for the
official architectures) x N = 32 random masks (the same masking noise, ratio 0.75), the
full zero-shot computation of spec section 1 (the MAE reconstructs every patch under
each mask, squared error summed over channels, 7-tap sigma 1.4 Gaussian blur with reflect
borders, mean over masks, max = image score), with the same random weights (official
key layout, generated from `--seed` by NumPy on both sides). Reported: step time,
images/s, achieved GFLOP/s against an analytic FLOP count (matmuls only; see
`flops_per_mask`), the ratio of the two, compile / first-iteration time apart from the
steady state, the machine, and how closely the two sides' image scores agree.

PyTorch is optional. JAX runs in this interpreter; PyTorch runs in a subprocess of this
same file (`--torch-worker`, which imports neither JAX nor `maeday_jax`) under
`--torch-python` (default: this interpreter when it can import torch and timm), so the
two may live in different virtual environments. `--no-torch` skips it.

CPU (what the repository's own numbers were measured with):

    python tools/benchmark.py --arch base --batch 8 --steps 3 --warmup 1 --interleave \\
        --torch-python /work/venv-torch/bin/python --json runs/bench_base_cpu.json

By default PyTorch runs all its steps first, then JAX. `--interleave` keeps both alive
and alternates single steps (the order flipping every round), so that a shared machine's
changing load hits both sides alike: use it whenever others use the machine.

GPU: install a CUDA jaxlib (`pip install -U "jax[cuda12]"`) and a CUDA build of torch in
the PyTorch environment, then run the same command with `--torch-device cuda`; on
accelerators use `--dtype bfloat16` as well (parameters stay float32, matmuls in
bfloat16; PyTorch uses `torch.autocast` to the same effect). In float32 on a GPU the
worker enables TF32 matmuls, as JAX uses them by default there (set
`JAX_DEFAULT_MATMUL_PRECISION=highest` in the environment for full float32 on the JAX
side instead, and compare with care). TPU: `pip install -U "jax[tpu]"` and the same
command with `--no-torch` (there is no PyTorch side on TPU). JAX splits the batch over
all local devices (`--batch` must be a multiple of their number).
Without `--interleave` the PyTorch worker runs first, so that JAX's GPU memory
preallocation cannot starve it; with it, JAX preallocation is turned off
(`XLA_PYTHON_CLIENT_PREALLOCATE=false`) for `--torch-device cuda`.

JAX options worth trying: `--mask-batch-size` (None, the `maeday_jax.zero_shot` default:
all masks in one vmapped pass, B x N reconstructions at once like the PyTorch side; k: a
loop over chunks of k masks, which bounds memory) and XLA flags through the environment
(`XLA_FLAGS=...`). PyTorch tries fused (`F.scaled_dot_product_attention`) and unfused
(explicit softmax) attention and reports the faster one unless `--torch-attention` picks
one.

Timings on shared machines are noisy: the report includes the load average at the start
and the end, every step's wall and process CPU time, and the medians are what the ratio
uses.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
# The worker's single JSON result line starts with this, so that library chatter on
# stdout cannot be mistaken for it.
RESULT_PREFIX = "MAEDAY_BENCHMARK_RESULT "

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
BLUR_SIZE = 7
BLUR_SIGMA = 1.4


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


def inputs_digest(images: np.ndarray, noise: np.ndarray) -> str:
  """Short hash proving both processes generated the same inputs."""
  h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
  h.update(np.ascontiguousarray(noise).tobytes())
  return h.hexdigest()[:16]


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


def _log(msg: str) -> None:
  # Progress goes to stderr: stdout of the worker carries the result lines.
  print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------
# PyTorch side (runs in the worker subprocess: no JAX, no maeday_jax).
# ----------------------------------------------------------------------------------------


class TorchBench:
  """The PyTorch reference, set up for one configuration; `step(mode)` times one batch.

  `mode` is the attention path of every block: "fused" (`F.scaled_dot_product_attention`)
  or "unfused" (explicit softmax(q k^T) v, what the MAE release ran).
  """

  def __init__(self, args, arch: dict):
    import torch

    sys.path.insert(0, TOOLS_DIR)
    import torch_mae_reference as ref

    self.torch, self.args, self.arch = torch, args, arch
    threads = args.torch_threads or (
      len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    torch.set_num_threads(threads)
    self.device = torch.device(args.torch_device)
    self.cuda = self.device.type == "cuda"
    if self.cuda and not torch.cuda.is_available():
      raise SystemExit("--torch-device cuda: this torch build sees no CUDA device.")
    if self.cuda:
      # JAX's default float32 matmul precision on GPUs is TF32; PyTorch's is full float32.
      # Match JAX, or the float32 comparison measures two different arithmetics.
      torch.backends.cuda.matmul.allow_tf32 = True
      torch.backends.cudnn.allow_tf32 = True

    self.images_np, self.noise_np = make_inputs(arch, args.batch, args.num_masks, args.seed)
    model = ref.build_reference(**arch)
    state = {k: torch.from_numpy(v) for k, v in random_state_dict(arch, args.seed).items()}
    model.load_state_dict(state, strict=True)
    self.model = model.to(self.device).eval()
    self.images = torch.from_numpy(self.images_np).permute(0, 3, 1, 2).contiguous()
    self.images = self.images.to(self.device)
    self.noise = torch.from_numpy(self.noise_np).to(self.device)
    taps = np.exp(-0.5 * ((np.arange(BLUR_SIZE) - BLUR_SIZE // 2) / BLUR_SIGMA) ** 2)
    taps = torch.tensor(taps / taps.sum(), dtype=torch.float32, device=self.device)
    self.kernel_h, self.kernel_w = taps.view(1, 1, -1, 1), taps.view(1, 1, 1, -1)
    self.chunk = args.torch_mask_chunk or args.num_masks
    self.modes = ["unfused", "fused"] if args.torch_attention == "both" else [args.torch_attention]
    self.first: dict[str, float] = {}
    self.times: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in self.modes}
    self.scores = None

  def _score(self):
    """Maps (B, H, W) and scores (B,): spec section 1 written literally, in torch."""
    torch, F = self.torch, self.torch.nn.functional
    batch, num_masks, size = self.args.batch, self.args.num_masks, self.arch["img_size"]
    radius = BLUR_SIZE // 2
    autocast = torch.autocast(
      self.device.type, dtype=torch.bfloat16, enabled=self.args.dtype == "bfloat16"
    )
    total = torch.zeros(batch, 1, size, size, device=self.device)
    for start in range(0, num_masks, self.chunk):
      m = min(self.chunk, num_masks - start)
      x = self.images.repeat_interleave(m, dim=0)  # (B*m, 3, H, W), image-major
      noise = self.noise[:, start : start + m].reshape(batch * m, -1)
      with autocast:
        latent, _, ids_restore = self.model.forward_encoder(x, self.args.mask_ratio, noise)
        pred = self.model.forward_decoder(latent, ids_restore)
      recon = self.model.unpatchify(pred.float())
      err = (x - recon).square().sum(dim=1, keepdim=True)  # (B*m, 1, H, W)
      # Blur every mask's error map (a per-channel blur of the channel sum is the blur of
      # the sum), reflect borders in the numpy sense, as separable 7x1 and 1x7 passes.
      err = F.pad(err, (radius, radius, radius, radius), mode="reflect")
      err = F.conv2d(F.conv2d(err, self.kernel_h), self.kernel_w)
      total += err.view(batch, m, size, size).sum(dim=1, keepdim=True)
    maps = total[:, 0] / num_masks
    return maps, maps.amax(dim=(-2, -1))

  def _run(self, mode: str) -> None:
    for blk in list(self.model.blocks) + list(self.model.decoder_blocks):
      blk.attn.fused_attn = mode == "fused"
    with self.torch.inference_mode():
      _, self.scores = self._score()
    if self.cuda:
      self.torch.cuda.synchronize()

  def prepare(self, mode: str) -> None:
    """First iteration (timed apart: one-time allocations) and the warm-up steps."""
    wall, _ = timed(lambda: self._run(mode))
    self.first[mode] = wall
    _log(f"[torch {mode}] first iteration {wall:.2f} s")
    for i in range(self.args.warmup):
      wall, _ = timed(lambda: self._run(mode))
      _log(f"[torch {mode}] warmup {i + 1}/{self.args.warmup}: {wall:.2f} s")

  def step(self, mode: str) -> tuple[float, float]:
    wall, cpu = timed(lambda: self._run(mode))
    walls, cpus = self.times[mode]
    walls.append(wall)
    cpus.append(cpu)
    _log(f"[torch {mode}] step {len(walls)}/{self.args.steps}: {wall:.2f} s (CPU {cpu:.2f} s)")
    return wall, cpu

  def summary(self) -> dict:
    torch, args = self.torch, self.args
    flops = flops_per_mask(self.arch, args.mask_ratio)["total"] * args.num_masks
    runs = {
      mode: {
        "first_iteration_s": self.first[mode],
        **step_stats(*self.times[mode], args.batch, flops),
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
      "dtype": args.dtype,
      "mask_chunk": self.chunk,
      "attention": best,
      "attention_runs": runs,
      **runs[best],
      "scores": self.scores.float().cpu().numpy().tolist(),
      "inputs_digest": inputs_digest(self.images_np, self.noise_np),
      "machine": machine_info(),
    }
    try:
      import timm

      result["timm"] = timm.__version__
    except ImportError:
      pass
    return result


def _emit(payload: dict) -> None:
  print(RESULT_PREFIX + json.dumps(payload), flush=True)


def torch_worker(args, arch: dict) -> int:
  """`--torch-worker`: all steps at once, or (`--torch-serve`) one per stdin command."""
  bench = TorchBench(args, arch)
  for mode in bench.modes:
    bench.prepare(mode)
  if not args.torch_serve:
    for mode in bench.modes:
      for _ in range(args.steps):
        bench.step(mode)
  else:
    _emit({"ready": True})
    for line in sys.stdin:
      command = line.split()
      if command == ["done"]:
        break
      if len(command) != 2 or command[0] != "step" or command[1] not in bench.modes:
        raise SystemExit(f"torch worker: bad command {line!r}")
      wall, cpu = bench.step(command[1])
      _emit({"wall_s": wall, "cpu_s": cpu})
  _emit(bench.summary())
  return 0


def _torch_importable() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "timm", "safetensors"))


class TorchProcess:
  """This file in `--torch-worker` mode under another interpreter, read line by line."""

  def __init__(self, args, python: str, serve: bool):
    forward = []
    for flag in (
      "arch",
      "batch",
      "num_masks",
      "mask_ratio",
      "steps",
      "warmup",
      "dtype",
      "seed",
      "torch_device",
      "torch_attention",
      "torch_threads",
      "torch_mask_chunk",
    ):
      forward += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    cmd = [python, os.path.abspath(__file__), "--torch-worker", *forward]
    if serve:
      cmd.append("--torch-serve")
    _log(f"[torch] {' '.join(cmd)}")
    # stderr (progress) goes straight through; stdout carries the result lines.
    self.proc = subprocess.Popen(
      cmd, stdin=subprocess.PIPE if serve else subprocess.DEVNULL, stdout=subprocess.PIPE, text=True
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
# JAX side.
# ----------------------------------------------------------------------------------------


class JaxBench:
  """The compiled zero-shot step of `maeday_jax`; `step()` times one batch."""

  def __init__(self, args, arch: dict):
    import jax
    import jax.numpy as jnp

    from maeday_jax import models, parallel, zero_shot
    from maeday_jax.checkpoints import state_dict

    self.jax, self.args, self.arch = jax, args, arch
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    model = models.create(args.arch, dtype=dtype, mask_ratio=args.mask_ratio)
    mismatched = {k: (getattr(model, k), v) for k, v in arch.items() if getattr(model, k) != v}
    if mismatched or model.mlp_ratio != MLP_RATIO:
      raise RuntimeError(f"ARCHS[{args.arch!r}] disagrees with maeday_jax: {mismatched}")

    mesh = parallel.data_mesh()
    devices = mesh.devices.size
    if args.batch % devices:
      raise SystemExit(f"--batch {args.batch} must be a multiple of the {devices} JAX devices.")
    self.images_np, self.noise_np = make_inputs(arch, args.batch, args.num_masks, args.seed)
    state = random_state_dict(arch, args.seed)
    params = state_dict.to_params(state, models.param_shapes(model), "benchmark weights")
    params = parallel.replicate(params, mesh)
    images, noise = parallel.shard_batch((self.images_np, self.noise_np), mesh)

    # The scoring step of `zero_shot.make_scorer` (same jit and shardings), fed explicit
    # noise so that PyTorch gets identical masks.
    def score(params, images, noise):
      maps = zero_shot.anomaly_maps_from_noise(
        model, params, images, noise, args.mask_ratio, args.mask_batch_size
      )
      return maps, zero_shot.image_scores(maps)

    data, whole = parallel.batch_sharded(mesh), parallel.replicated(mesh)
    jitted = jax.jit(score, in_shardings=(whole, data, data), out_shardings=(data, data))

    t0 = time.perf_counter()
    lowered = jitted.lower(params, images, noise)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    _, self.scores = jax.block_until_ready(compiled(params, images, noise))
    t3 = time.perf_counter()
    self.compile_times = {
      "lower_s": t1 - t0,
      "compile_s": t2 - t1,
      "first_run_s": t3 - t2,
      "first_call_s": t3 - t0,
    }
    _log(f"[jax] trace+lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s, first run {t3 - t2:.2f} s")
    self._run = lambda: jax.block_until_ready(compiled(params, images, noise))
    for i in range(args.warmup):
      wall, _ = timed(self._run)
      _log(f"[jax] warmup {i + 1}/{args.warmup}: {wall:.2f} s")
    self.wall: list[float] = []
    self.cpu: list[float] = []

  def step(self) -> tuple[float, float]:
    wall, cpu = timed(self._run)
    self.wall.append(wall)
    self.cpu.append(cpu)
    _log(f"[jax] step {len(self.wall)}/{self.args.steps}: {wall:.2f} s (CPU {cpu:.2f} s)")
    return wall, cpu

  def summary(self) -> dict:
    import flax
    import jaxlib

    jax, args = self.jax, self.args
    flops = flops_per_mask(self.arch, args.mask_ratio)["total"] * args.num_masks
    return {
      "side": "jax",
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "dtype": args.dtype,
      "mask_batch_size": args.mask_batch_size,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      **self.compile_times,
      **step_stats(self.wall, self.cpu, args.batch, flops),
      "scores": np.asarray(self.scores, np.float64).tolist(),
      "inputs_digest": inputs_digest(self.images_np, self.noise_np),
    }


def run_sequential(args, arch: dict, python: str | None) -> tuple[dict | None, dict | None]:
  """PyTorch first (all its steps), then JAX: neither disturbs the other."""
  torch_result = jax_result = None
  # PyTorch first: once JAX has started it may hold most of an accelerator's memory.
  if python:
    torch_result = TorchProcess(args, python, serve=False).finish()
  if not args.no_jax:
    bench = JaxBench(args, arch)
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
  worker = TorchProcess(args, python, serve=True)
  worker.read()  # set up, first iterations and warm-up done
  bench = JaxBench(args, arch)
  modes = ["unfused", "fused"] if args.torch_attention == "both" else [args.torch_attention]
  for i in range(args.steps):
    order = ["jax", *modes] if i % 2 == 0 else [*modes, "jax"]
    for side in order:
      if side == "jax":
        bench.step()
      else:
        worker.command(f"step {side}")
  worker.command("done")
  return bench.summary(), worker.finish()


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------


def _report(result: dict) -> str:
  """The human-readable summary printed at the end."""
  cfg, arch, flops = result["config"], result["arch"], result["flops"]
  mach, jx, pt = result["machine"], result.get("jax"), result.get("pytorch")
  per_image = flops["per_image"] / 1e9
  lines = [
    f"MAEDAY zero-shot benchmark, {result['timestamp_utc']}",
    f"machine: {mach['cpu_model']}, {mach['cpu_count']} CPUs "
    f"({mach.get('cpus_usable', '?')} usable), load average at start "
    f"{mach.get('load_average_1_5_15')}, at the end {result.get('load_average_end_1_5_15')}",
    f"arch {cfg['arch']}: {arch['img_size']} px, patch {arch['patch_size']}, encoder "
    f"{arch['embed_dim']}/{arch['depth']}/{arch['num_heads']}, decoder "
    f"{arch['decoder_embed_dim']}/{arch['decoder_depth']}/{arch['decoder_num_heads']}",
    f"work per step: {cfg['batch']} images x {cfg['num_masks']} masks (ratio "
    f"{cfg['mask_ratio']}: encoder on {flops['encoder_tokens']} tokens, decoder on "
    f"{flops['decoder_tokens']}), {cfg['dtype']}, {cfg['steps']} timed steps after "
    f"{cfg['warmup']} warm-up" + (", sides interleaved step by step" if cfg["interleave"] else ""),
    f"analytic FLOPs: {flops['per_mask']['total'] / 1e9:.4g} GFLOP per mask "
    f"(encoder blocks {flops['per_mask']['encoder_blocks'] / 1e9:.4g}, decoder blocks "
    f"{flops['per_mask']['decoder_blocks'] / 1e9:.4g}), {per_image:.4g} GFLOP per image",
  ]
  if jx:
    lines += [
      f"JAX {jx['jax']} (jaxlib {jx['jaxlib']}, flax {jx['flax']}) on {jx['devices']}, "
      f"mask_batch_size={jx['mask_batch_size']}"
      + (f", XLA_FLAGS={jx['xla_flags']!r}" if jx["xla_flags"] else ""),
      f"  step {jx['step_median_s']:.3f} s (median; min {jx['step_min_s']:.3f}) -> "
      f"{jx['images_per_s']:.3f} images/s ({1 / jx['images_per_s']:.3f} s/image), "
      f"{jx['gflops_per_s']:.1f} GFLOP/s; "
      f"CPU {jx['step_cpu_median_s']:.3g} s/step",
      f"  compile: trace+lower {jx['lower_s']:.2f} s + compile {jx['compile_s']:.2f} s; "
      f"first call incl. compile {jx['first_call_s']:.2f} s",
    ]
  if pt:
    dev = pt["device"] + (f" ({pt['device_name']})" if pt.get("device_name") else "")
    lines.append(
      f"PyTorch {pt['torch']} (timm {pt.get('timm', '?')}) on {dev}, {pt['threads']} "
      f"threads, inference_mode, {pt['attention']} attention (the faster of "
      f"{'/'.join(pt['attention_runs'])})"
    )
    for mode, run in pt["attention_runs"].items():
      lines.append(
        f"  {mode:>7}: step {run['step_median_s']:.3f} s (median; min "
        f"{run['step_min_s']:.3f}) -> {run['images_per_s']:.3f} images/s "
        f"({1 / run['images_per_s']:.3f} s/image), "
        f"{run['gflops_per_s']:.1f} GFLOP/s; CPU {run['step_cpu_median_s']:.3g} s/step; "
        f"first iteration {run['first_iteration_s']:.2f} s"
      )
  if "ratio_jax_over_torch" in result:
    r = result["ratio_jax_over_torch"]
    lines.append(
      f"ratio JAX / PyTorch (images/s): {r:.3f} ({'JAX' if r >= 1 else 'PyTorch'} faster); "
      f"CPU seconds per step PyTorch / JAX: {result['cpu_time_ratio_torch_over_jax']:.3f}"
    )
  if "score_max_rel_diff" in result:
    lines.append(
      f"image scores JAX vs PyTorch: max relative difference {result['score_max_rel_diff']:.2e}"
      + ("" if result["same_inputs"] else " (WARNING: the inputs differ between the sides)")
    )
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--arch", choices=sorted(ARCHS), default="base")
  parser.add_argument("--batch", type=int, default=8, help="images per step")
  parser.add_argument("--num-masks", type=int, default=32)
  parser.add_argument("--mask-ratio", type=float, default=0.75)
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--seed", type=int, default=0, help="inputs and weights")
  parser.add_argument("--json", metavar="OUT", help="also write every figure to this file")
  g = parser.add_argument_group("JAX")
  g.add_argument(
    "--mask-batch-size",
    type=int,
    default=None,
    help="masks reconstructed together (zero_shot default None: all at once)",
  )
  g.add_argument("--no-jax", action="store_true", help="PyTorch only")
  g = parser.add_argument_group("PyTorch (optional)")
  g.add_argument(
    "--torch-python",
    help="interpreter with torch + timm (default: this one, if it has them)",
  )
  g.add_argument("--torch-device", choices=["cpu", "cuda"], default="cpu")
  g.add_argument("--torch-attention", choices=["both", "fused", "unfused"], default="both")
  g.add_argument("--torch-threads", type=int, default=0, help="0 = every usable CPU")
  g.add_argument(
    "--torch-mask-chunk", type=int, default=0, help="masks per forward pass (0 = all at once)"
  )
  g.add_argument("--no-torch", action="store_true", help="JAX only")
  parser.add_argument(
    "--interleave",
    action="store_true",
    help="alternate single JAX and PyTorch steps (fairer on a shared, noisy machine; both "
    "processes hold their memory at once)",
  )
  parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--torch-serve", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.batch < 1 or args.num_masks < 1 or args.steps < 1 or args.warmup < 0:
    parser.error("--batch, --num-masks and --steps must be >= 1, --warmup >= 0.")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  arch = ARCHS[args.arch]
  if args.torch_worker:
    return torch_worker(args, arch)

  per_mask = flops_per_mask(arch, args.mask_ratio)
  result = {
    "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    "config": {
      k: v for k, v in vars(args).items() if k not in ("torch_worker", "torch_serve", "json")
    },
    "arch": arch,
    "machine": machine_info(),
    "flops": {
      "counted": "matmuls only, 2 FLOPs per multiply-add",
      "encoder_tokens": num_visible(arch, args.mask_ratio) + 1,
      "decoder_tokens": num_patches(arch) + 1,
      "per_mask": per_mask,
      "per_image": per_mask["total"] * args.num_masks,
    },
  }

  python = None
  if not args.no_torch:
    python = args.torch_python
    if python and not (shutil.which(python) or os.access(python, os.X_OK)):
      raise SystemExit(f"--torch-python {python}: no such executable.")
    if python is None and _torch_importable():
      python = sys.executable
    if python is None:
      _log("[torch] skipped: torch/timm not importable here; pass --torch-python PATH.")
  if args.interleave and python and not args.no_jax:
    result["jax"], result["pytorch"] = run_interleaved(args, arch, python)
  else:
    result["jax"], result["pytorch"] = run_sequential(args, arch, python)
  result = {k: v for k, v in result.items() if v is not None}

  jx, pt = result.get("jax"), result.get("pytorch")
  if jx and pt:
    result["ratio_jax_over_torch"] = jx["images_per_s"] / pt["images_per_s"]
    result["cpu_time_ratio_torch_over_jax"] = pt["step_cpu_median_s"] / jx["step_cpu_median_s"]
    a, b = np.asarray(jx["scores"]), np.asarray(pt["scores"])
    result["score_max_rel_diff"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))
    result["same_inputs"] = jx["inputs_digest"] == pt["inputs_digest"]

  if hasattr(os, "getloadavg"):
    result["load_average_end_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
  print(_report(result), flush=True)
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

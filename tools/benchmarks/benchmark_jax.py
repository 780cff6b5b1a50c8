"""The JAX side of `tools/benchmark.py`: `JaxSide`, what both tasks' JAX runs share.

It runs `maeday_jax`'s model on the benchmark weights of `benchmark_common`. JAX and
`maeday_jax` are imported when a `JaxSide` is built, not when this module is: the task
modules define both sides, and the PyTorch worker imports them without ever building a
JAX side (it must import neither JAX nor `maeday_jax`).
"""

from __future__ import annotations

import os
import time

from benchmark_common import MLP_RATIO, log, random_state_dict, step_stats, timed


def data_mesh(batch: int):
  """The data mesh over every JAX device; refuses a `--batch` that does not divide over it."""
  from maeday_jax import parallel

  mesh = parallel.data_mesh()
  devices = mesh.devices.size
  if batch % devices:
    raise SystemExit(f"--batch {batch} must be a multiple of the {devices} JAX devices.")
  return mesh


def models_attention(model) -> str:
  """The attention implementation the model's setting resolves to on this backend."""
  from maeday_jax import models

  if not isinstance(model, models.MaskedAutoencoder):
    return "-"  # A backbone (PatchCore) has no attention.
  head_dim = model.embed_dim // model.num_heads
  resolved = models.resolve_attention(model.attention, model.dtype, head_dim)
  return resolved if model.attention == resolved else f"{model.attention} -> {resolved}"


class JaxSide:
  """`maeday_jax`'s model on the benchmark weights; subclasses compile and time a step.

  A subclass builds its inputs, compiles its step with `compile`, sets `_run` (one blocking
  step) and calls `warm_up`; `step()` then times one `_run`.
  """

  def __init__(self, args, arch: dict, flops_per_item: float):
    import jax

    from maeday_jax import model_builder, models, parallel
    from maeday_jax.checkpoints import state_dict

    self.jax, self.args, self.arch = jax, args, arch
    self.flops_per_item = flops_per_item
    dtype = model_builder.compute_dtype(args.dtype)
    self.model = models.create(
      args.arch, dtype=dtype, mask_ratio=args.mask_ratio, attention=args.attention
    )
    mismatched = {
      k: (getattr(self.model, k), v) for k, v in arch.items() if getattr(self.model, k) != v
    }
    if mismatched or self.model.mlp_ratio != MLP_RATIO:
      raise RuntimeError(f"ARCHS[{args.arch!r}] disagrees with maeday_jax: {mismatched}")
    self.mesh = data_mesh(args.batch)
    state = random_state_dict(arch, args.seed)
    params = state_dict.to_params(state, models.param_shapes(self.model), "benchmark weights")
    self.params = parallel.replicate(params, self.mesh)
    self.compile_times: dict[str, float] = {}
    self.wall: list[float] = []
    self.cpu: list[float] = []

  def compile(self, lower):
    """`lower()` (returns a `jax.stages.Lowered`), compiled; both parts timed apart."""
    t0 = time.perf_counter()
    lowered = lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    self.compile_times = {"lower_s": t1 - t0, "compile_s": t2 - t1}
    log(f"[jax] trace+lower {t1 - t0:.2f} s, compile {t2 - t1:.2f} s")
    return compiled

  def _run(self) -> None:
    """One blocking step; set by the subclass."""
    raise NotImplementedError

  def warm_up(self) -> None:
    """The first run (timed apart) and the untimed warm-up steps."""
    wall, _ = timed(self._run)
    self.compile_times["first_run_s"] = wall
    self.compile_times["first_call_s"] = sum(self.compile_times.values())
    log(f"[jax] first run {wall:.2f} s")
    for i in range(self.args.warmup):
      wall, _ = timed(self._run)
      log(f"[jax] warmup {i + 1}/{self.args.warmup}: {wall:.2f} s")

  def step(self) -> tuple[float, float]:
    wall, cpu = timed(self._run)
    self.wall.append(wall)
    self.cpu.append(cpu)
    log(f"[jax] step {len(self.wall)}/{self.args.steps}: {wall:.2f} s (CPU {cpu:.2f} s)")
    return wall, cpu

  def extra_summary(self) -> dict:
    return {}

  def summary(self) -> dict:
    import flax
    import jaxlib

    jax = self.jax
    return {
      "side": "jax",
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "dtype": jax.numpy.dtype(self.model.dtype).name,
      "attention": models_attention(self.model),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
      **self.compile_times,
      **step_stats(self.wall, self.cpu, self.args.batch, self.flops_per_item),
      **self.extra_summary(),
    }

"""PMAD's cost: the reconstructor's training step and the detector's scoring (JAX only).

    python tools/benchmark.py --task pmad --variant test --image-size 32    # the smoke shape
    python tools/benchmark.py --task pmad --variant base --image-size 224 \\
        --features-backbone wide_resnet50_2 --target codebook --batch 8 --steps 2 --warmup 1

Random weights of the real architectures (the shapes, not the weights, set the cost), so
it runs anywhere without a download; the settings are `settings.pmad.pmad_config`'s
(`use_smoke_test_sizes` for `--variant test`: a 16-code codebook, a small flow) with the
options below in place.

- training: the jitted `pmad.training.make_step` (frozen targets, the mixed masking
  strategies of `pmad.train.strategies`, the loss, AdamW with clipping) on a synthetic
  uint8 batch of `--batch` images. The codebook (`--target codebook`) is rows of the
  feature network's patch features of 16 synthetic images (what it holds does not change
  the cost; the detector fits it by k-means).
- scoring: the detector's jitted `score_function` (`scoring.compile_step`) on `--batch`
  ImageNet-normalised images, the detector restored from a state built here: random
  reconstructor, prototypes 10 % of the patch features of 16 synthetic images (the
  detector's `coreset_ratio`, drawn at random instead of by the greedy coreset), the
  random orthonormal projection to `pmad.flow.projection_dim` dimensions and a fresh
  flow (`pmad.flow.init_flow`).

Reported per phase: the trace + compile time apart, the median of `--steps` steps after
`--warmup` (wall and process CPU seconds), images/s, the compiled program's argument and
temporary bytes (XLA's memory analysis), the process's peak resident memory so far (CPU:
the scoring row's peak covers both phases, as training runs first) or the device's peak
bytes in use (GPU/TPU, when the backend reports them). `--target dvae` needs the
tokenizer's weights (`--tokenizer PATH`); the fit's other parts (coreset, flow fit,
codebook k-means) are not timed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import numpy as np
from benchmark_common import finish, machine_info, peak_memory, timed, use_checkout

use_checkout()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from maeday_jax import defaults, detectors, imagenet, models, parallel, training, zero_shot  # noqa: E402
from maeday_jax.detectors import pmad as pmad_detector  # noqa: E402
from maeday_jax.detectors import scoring  # noqa: E402
from maeday_jax.models import features as feature_nets  # noqa: E402
from maeday_jax.models import pmad_vit  # noqa: E402
from maeday_jax.pmad import flow  # noqa: E402
from maeday_jax.pmad import training as pmad_training  # noqa: E402
from maeday_jax.settings import pmad as pmad_settings  # noqa: E402

PROTOTYPE_IMAGES = 16  # Synthetic images whose patch features give prototypes and codebook.
PROTOTYPE_RATIO = 0.1


def _compiled_memory(compiled) -> dict:
  """XLA's memory analysis of a compiled program (per device), where the backend has one."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (not every backend implements it)
    return {}
  if analysis is None:
    return {}
  mib = lambda n: round(n / 2**20, 1)  # noqa: E731
  return {
    "program_argument_mib": mib(analysis.argument_size_in_bytes),
    "program_temp_mib": mib(analysis.temp_size_in_bytes),
    "program_output_mib": mib(analysis.output_size_in_bytes),
  }


def _section(args):
  """PMAD's settings for this benchmark (`pmad_config`, smoke sizes for the test model)."""
  section = pmad_settings.pmad_config()
  if args.variant == "test":
    pmad_settings.use_smoke_test_sizes(section)
  section.variant, section.image_size, section.target = args.variant, args.image_size, args.target
  section.features.backbone, section.features.checkpoint = args.features_backbone, "random"
  section.train.batch_size = args.batch
  if args.codebook_size:
    section.codebook_size = args.codebook_size
  if args.tokenizer:
    section.tokenizer = args.tokenizer
  return section


def _time_steps(run, warmup: int, steps: int) -> dict:
  for _ in range(warmup):
    run()
  wall, cpu = [], []
  for _ in range(steps):
    w, c = timed(run)
    wall.append(w)
    cpu.append(c)
  median = statistics.median(wall)
  return {
    "step_times_s": [round(t, 4) for t in wall],
    "step_seconds": round(median, 4),
    "step_min_seconds": round(min(wall), 4),
    "step_cpu_seconds": round(statistics.median(cpu), 4),
  }


def run_training(args, section, net, synthetic, mesh) -> tuple[dict, object]:
  """The training step's figures, and the reconstructor it built (for the scoring)."""
  grid = section.image_size // pmad_vit.VARIANTS[section.variant]["patch_size"]
  frozen, out_dim = pmad_training.frozen_networks(section, net, synthetic, grid, args.seed)
  model = pmad_vit.create(section.variant, section.image_size, out_dim)
  total = args.warmup + args.steps + 1
  warmup = min(int(section.train.get("warmup_steps") or 0), total)
  optimizer, schedule = pmad_training.optimizer_for(section.train, total, warmup)
  params = pmad_vit.init_params(model, jax.random.key(args.seed))
  state = training.init_state(params, optimizer)
  state["error_ema"] = jnp.ones((model.num_patches,), jnp.float32)
  state = parallel.replicate(state, mesh)
  arrays = parallel.replicate(frozen.arrays, mesh)
  step = pmad_training.make_step(model, frozen, optimizer, schedule, section.train, mesh, 0)
  rng = np.random.default_rng([args.seed, 2])
  size = section.image_size
  images = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
  images = parallel.shard_batch(images, mesh)
  key = jax.random.key(args.seed)

  start = time.perf_counter()
  compiled = step.lower(state, arrays, images, key).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}
  losses = []

  def run():
    holder["state"], metrics = compiled(holder["state"], arrays, images, key)
    losses.append(float(metrics["loss"]))  # Blocks until the step is done.

  timing = _time_steps(run, args.warmup, args.steps)
  param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  row = {
    "phase": "training",
    "variant": section.variant,
    "image_size": size,
    "target": frozen.kind,
    "out_dim": out_dim,
    "reconstructor_params_m": round(param_count / 1e6, 2),
    "batch": args.batch,
    "masked_patches": pmad_training.num_masked(float(section.train.mask_ratio), model.num_patches),
    "strategies": str(section.train.strategies),
    "compile_seconds": round(compile_s, 3),
    **timing,
    "images_per_second": round(args.batch / timing["step_seconds"], 3),
    "final_loss": round(losses[-1], 4),
    **_compiled_memory(compiled),
    **peak_memory(),
  }
  return row, (model, holder["state"]["params"])


def run_scoring(args, section, net, prototype_features, reconstructor, mesh) -> dict:
  """The detector's scoring figures (the detector restored from a state built here)."""
  model, params = reconstructor
  width = int(prototype_features.shape[-1])
  rows = prototype_features.reshape(-1, width)
  rng = np.random.default_rng([args.seed, 3])
  count = max(1, int(PROTOTYPE_RATIO * len(rows)))
  prototypes = rows[rng.choice(len(rows), count, replace=False)]
  dim = int(section.flow.projection_dim)
  if dim and dim < width:
    projection = np.linalg.qr(rng.standard_normal((width, dim)))[0].astype(np.float32)
  else:
    projection, dim = np.eye(width, dtype=np.float32), width
  _, flow_params = flow.init_flow(
    jax.random.key(args.seed + 1),
    dim,
    num_couplings=int(section.flow.couplings),
    hidden=int(section.flow.hidden),
  )
  config = defaults.fit_config()
  config.pmad = section
  detector = detectors.create(config, "pmad")
  record = {
    "reconstructor": pmad_vit.architecture(model),
    "target": section.target,
    "mask_ratio": float(section.mask_ratio),
    "flow_dim": dim,
    "features": {"architecture": feature_nets.describe(net), "weights": None},
  }
  state = {
    "reconstructor": training.to_host(params),
    "features": net.params,
    "prototypes": jnp.asarray(prototypes),
    "projection": jnp.asarray(projection),
    "flow": flow_params,
  }
  detector.restore(record, state)
  step = scoring.compile_step(detector, mesh, args.batch)
  replicated = parallel.replicate(detector.state, mesh)
  size = section.image_size
  images_u8 = rng.integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
  local = np.asarray(imagenet.normalize(jnp.asarray(images_u8, jnp.float32)))
  images, ids = parallel.shard_batch((local, zero_shot.image_ids(local)), mesh)
  key = detector.scoring_key()

  start = time.perf_counter()
  compiled = step.lower(replicated, images, ids, key).compile()
  compile_s = time.perf_counter() - start
  scores = []

  def run():
    _, image_scores = compiled(replicated, images, ids, key)
    scores.append(np.asarray(image_scores))  # Blocks until the step is done.

  timing = _time_steps(run, args.warmup, args.steps)
  return {
    "phase": "scoring",
    "variant": section.variant,
    "image_size": size,
    "target": section.target,
    "features_backbone": section.features.backbone,
    "feature_dim": width,
    "prototypes": count,
    "flow_dim": dim,
    "proposal_ratio": float(section.mask_ratio),
    "batch": args.batch,
    "compile_seconds": round(compile_s, 3),
    **timing,
    "images_per_second": round(args.batch / timing["step_seconds"], 3),
    "scores_finite": bool(np.isfinite(scores[-1]).all()),
    **_compiled_memory(compiled),
    **peak_memory(),
  }


def report(result: dict) -> str:
  m, cfg = result["machine"], result["config"]
  lines = [
    f"PMAD cost (JAX {result['jax']} on {result['devices']}), {cfg['warmup']} warm-up + "
    f"{cfg['steps']} timed steps",
    f"command: {result['command']}",
    f"machine: {m['cpu_model']}, {m['cpu_count']} CPUs ({m.get('cpus_usable', '?')} usable); "
    f"load average at start {m.get('load_average_1_5_15')}, at end "
    f"{result.get('load_average_end_1_5_15')}",
  ]
  for row in result["rows"]:
    memory = f"peak RSS so far {row['host_peak_rss_mib']} MiB"
    if "device_peak_mib" in row:
      memory += f", device peak {row['device_peak_mib']} MiB"
    if "program_temp_mib" in row:
      memory += (
        f", program arguments {row['program_argument_mib']} + temporaries "
        f"{row['program_temp_mib']} MiB"
      )
    if row["phase"] == "training":
      what = (
        f"training ({row['variant']} at {row['image_size']} px, {row['reconstructor_params_m']} M "
        f"params, {row['target']} targets of {row['out_dim']}, {row['masked_patches']} patches "
        f"masked, batch {row['batch']}; loss {row['final_loss']})"
      )
    else:
      what = (
        f"scoring ({row['features_backbone']} {row['feature_dim']}-d features, "
        f"{row['prototypes']} prototypes, {row['flow_dim']}-d flow, batch {row['batch']}; "
        f"finite scores: {row['scores_finite']})"
      )
    lines += [
      f"{what}:",
      f"  compile {row['compile_seconds']:.2f} s; step {row['step_seconds']:.4g} s (median; min "
      f"{row['step_min_seconds']:.4g}; CPU {row['step_cpu_seconds']:.4g} s) -> "
      f"{row['images_per_second']:.4g} images/s",
      f"  memory: {memory}",
    ]
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", choices=sorted(pmad_vit.VARIANTS), default="test")
  parser.add_argument("--image-size", type=int, default=32)
  parser.add_argument(
    "--target", choices=pmad_settings.TARGETS, default="codebook", help="dvae: --tokenizer too"
  )
  parser.add_argument("--tokenizer", default="", help="the dVAE's weights (a file)")
  parser.add_argument("--codebook-size", type=int, default=0, help="0: the settings' size")
  parser.add_argument(
    "--features-backbone", default="test_wide", help="e.g. wide_resnet50_2 (random weights)"
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  if args.target == "dvae" and not args.tokenizer:
    parser.error("--target dvae needs the tokenizer's weights: --tokenizer PATH.")
  if args.steps < 1 or args.warmup < 0 or args.batch < 1:
    parser.error("--steps and --batch must be >= 1, --warmup >= 0.")
  if args.batch % len(jax.devices()):
    parser.error(f"--batch must be a multiple of the {len(jax.devices())} devices.")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  section = _section(args)
  pmad_detector.validate_section(section)  # A bad size or target, named, before any work.
  result = {
    "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    "config": vars(args),
    "machine": machine_info(),
    "jax": jax.__version__,
    "devices": f"{jax.devices()[0].platform} x {len(jax.devices())}",
  }
  mesh = parallel.data_mesh()
  net = models.load(section.features.backbone, "random", key=jax.random.key(args.seed))
  grid = section.image_size // pmad_vit.VARIANTS[section.variant]["patch_size"]
  rng = np.random.default_rng([args.seed, 0])
  size = section.image_size
  synthetic = rng.integers(0, 256, (PROTOTYPE_IMAGES, size, size, 3), dtype=np.uint8)
  prototype_features = pmad_training.features_of(
    net, synthetic, section.features.layers, grid, int(section.features.image_size or 0), 8
  )
  train_row, reconstructor = run_training(args, section, net, synthetic, mesh)
  score_row = run_scoring(args, section, net, prototype_features, reconstructor, mesh)
  result["rows"] = [train_row, score_row]
  return finish(result, report, args.json)


if __name__ == "__main__":
  raise SystemExit(main())

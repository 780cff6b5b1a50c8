"""MuSc's cost against its group size (JAX only).

    python tools/benchmark.py --task musc --groups 4,8,16           # ViT-S/14 at 448 px
    python tools/benchmark.py --task musc --backbone dinov2_test --image-size 56

Random weights of the real architecture (`--backbone dinov2_vits14`, the method's
default; the shapes, not the weights, set the cost), so it runs anywhere without the
download. MuSc's pairwise nearest-patch distances grow with the square of the group
(B x B x P x P distances per layer and degree), the features linearly; on several devices
the group is split over them. Reported per group size: the compile time apart, the median
of `--steps` scoring steps, images/s, and the process's peak resident memory (CPU) or the
device's peak bytes in use (GPU/TPU, when the backend reports them).

(AnomalyDINO's speed, against anomalib's, is `--task anomalydino`:
`benchmark_anomalydino.py`.)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
from benchmark_common import peak_memory, use_checkout

use_checkout()

import jax  # noqa: E402

from maeday_jax import defaults, detectors, parallel  # noqa: E402
from maeday_jax.detectors import scoring  # noqa: E402


def _detector(args) -> detectors.Detector:
  config = defaults.fit_config()
  section = config.musc
  section.backbone, section.checkpoint, section.image_size = (
    args.backbone,
    "random",
    args.image_size,
  )
  if args.backbone.startswith("dinov2_test"):
    section.layers = (0, 2)
  return detectors.create(config, "musc")


def _time(step, replicated, images, key, mesh, steps: int) -> tuple[float, list[float]]:
  start = time.perf_counter()
  jax.block_until_ready(scoring.score_local(step, replicated, images, key, mesh))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(scoring.score_local(step, replicated, images, key, mesh))
    times.append(time.perf_counter() - start)
  return compile_s, times


def run_musc(args) -> list[dict]:
  rng = np.random.default_rng(0)
  size = args.image_size
  detector = _detector(args)
  detector.fit(None, None)
  mesh = parallel.data_mesh()
  rows = []
  for group in [int(g) for g in args.groups.split(",")]:
    step = scoring.compile_step(detector, mesh, group)
    images = rng.normal(size=(group, size, size, 3)).astype(np.float32)
    replicated = parallel.replicate(detector.state, mesh)
    compile_s, times = _time(step, replicated, images, detector.scoring_key(), mesh, args.steps)
    median = statistics.median(times)
    rows.append(
      {
        "task": "musc",
        "backbone": args.backbone,
        "image_size": size,
        "group": group,
        "compile_seconds": round(compile_s, 3),
        "step_seconds": round(median, 4),
        "seconds_per_image": round(median / group, 4),
        "images_per_second": round(group / median, 3),
        **peak_memory(),
      }
    )
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", default="dinov2_vits14")
  parser.add_argument("--image-size", type=int, default=448)
  parser.add_argument("--groups", default="2,4,8")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  rows = run_musc(args)
  device = jax.devices()[0].platform
  machine = f"{platform.processor() or platform.machine()}, {device} x {len(jax.devices())}"
  for row in rows:
    print(json.dumps({**row, "machine": machine}))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": machine, "rows": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())

"""Scoring service throughput and latency: `maeday_jax.serve` on loopback, N concurrent requests.

    python tools/benchmark.py --task serve                  # a tiny fitted PatchCore
    python tools/benchmark.py --task serve --detector runs/line3/detector \\
        --requests 1000 --concurrency 32 --max-batch 16 --image-size 1024
    python tools/benchmarks/benchmark_serve.py --requests 200   # without the entry point

The service (`serve.create_app` under uvicorn, the app `python -m maeday_jax.serve` runs)
starts in this process on 127.0.0.1 with `--detector` (a fitted or exported folder), or,
without one, with a tiny PatchCore (random 32 px backbone: speed only) fitted on random
arrays in a temporary folder. `--concurrency` client threads then post `--requests` PNG
images of `--image-size` pixels (distinct random images, decoded and resized by the
service as the bulk job does) after `--warmup` untimed ones. Reported: requests/s over
the timed wall, client-side p50/p90/p99 latency, the mean dynamic batch size (from
/metrics), the statuses, and the machine's load average at the start and the end. The
clients share the machine with the service: on a small CPU machine their threads take
CPU from it, so the figures are a lower bound of the service alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import os
import sys
import tempfile
import time

import numpy as np
from benchmark_common import machine_info, use_checkout, write_json
from PIL import Image

use_checkout()


def _tiny_detector(folder: str) -> str:
  """A tiny PatchCore fitted on random arrays, saved under `folder`."""
  import jax

  from maeday_jax import defaults, detectors

  detector = detectors.create(defaults.fit_config("runlocal"), "patchcore")
  rng = np.random.default_rng(0)
  shots, heldout = (rng.normal(size=(n, 32, 32, 3)).astype(np.float32) for n in (2, 3))
  normals = detectors.NormalImages.from_arrays(shots, heldout)
  detectors.fit_with_statistics(detector, normals, jax.random.key(0))
  return str(detectors.save(detector, os.path.join(folder, "detector")))


def _bodies(count: int, size: int) -> list[bytes]:
  rng = np.random.default_rng(1)
  bodies = []
  for _ in range(min(count, 32)):  # Distinct content; repeated past 32 to bound the set-up.
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    bodies.append(buffer.getvalue())
  return [bodies[i % len(bodies)] for i in range(count)]


def _mean_batch(metrics_text: str) -> float | None:
  from prometheus_client.parser import text_string_to_metric_families

  values = {
    s.name: s.value
    for family in text_string_to_metric_families(metrics_text)
    for s in family.samples
    if s.name.startswith("maeday_serve_batch_size_")
  }
  count = values.get("maeday_serve_batch_size_count")
  return values["maeday_serve_batch_size_sum"] / count if count else None


def run(args) -> dict:
  """Serves, fires the requests, returns the figures."""
  import httpx

  from maeday_jax import serve

  result = {"command": " ".join(sys.argv), "machine": machine_info(), "config": vars(args)}
  with tempfile.TemporaryDirectory() as tmp:
    spec = args.detector or _tiny_detector(tmp)
    started = time.perf_counter()
    model = serve.load_model(spec, max_batch=args.max_batch)
    result["load_and_compile_s"] = time.perf_counter() - started
    app = serve.create_app(model, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size)
    bodies = _bodies(args.warmup + args.requests, args.image_size)
    limits = httpx.Limits(max_connections=args.concurrency)
    with (
      serve.BackgroundServer(app) as server,
      httpx.Client(base_url=server.url, timeout=120, limits=limits) as client,
    ):

      def post(body: bytes) -> tuple[int, float]:
        sent = time.perf_counter()
        status = client.post("/score", content=body, headers={"content-type": "image/png"})
        return status.status_code, time.perf_counter() - sent

      with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(post, bodies[: args.warmup]))
        before = _mean_batch(client.get("/metrics").text)
        started = time.perf_counter()
        answers = list(pool.map(post, bodies[args.warmup :]))
        wall = time.perf_counter() - started
      metrics = client.get("/metrics").text
  latencies = np.array([seconds for _, seconds in answers])
  statuses: dict[str, int] = {}
  for status, _ in answers:
    statuses[str(status)] = statuses.get(str(status), 0) + 1
  result.update(
    detector=model.name,
    input_size=model.input_size,
    wall_s=wall,
    requests_per_s=len(answers) / wall,
    latency_ms={q: float(np.percentile(latencies, q) * 1e3) for q in (50, 90, 99)},
    statuses=statuses,
    mean_batch=_mean_batch(metrics),
    mean_batch_warmup=before,
    load_average_end_1_5_15=[round(x, 2) for x in os.getloadavg()],
  )
  return result


def report(result: dict) -> str:
  """The human-readable summary."""
  cfg, machine, latency = result["config"], result["machine"], result["latency_ms"]
  mean_batch = result["mean_batch"]
  return "\n".join(
    [
      f"scoring service benchmark: {machine['cpu_model']}, {machine['cpu_count']} CPUs "
      f"({machine.get('cpus_usable', '?')} usable), load average at start "
      f"{machine.get('load_average_1_5_15')}, at the end {result['load_average_end_1_5_15']}",
      f"detector {result['detector']} ({result['input_size']} px), max batch "
      f"{cfg['max_batch']}, max wait {cfg['max_wait_ms']} ms; load and compile "
      f"{result['load_and_compile_s']:.1f} s",
      f"{cfg['requests']} requests of {cfg['image_size']} px PNGs from {cfg['concurrency']} "
      f"client threads: {result['requests_per_s']:.1f} requests/s, latency p50 "
      f"{latency[50]:.1f} ms, p90 {latency[90]:.1f} ms, p99 {latency[99]:.1f} ms",
      f"mean batch {mean_batch:.2f}" if mean_batch else "mean batch: no batch",
      f"statuses {result['statuses']}",
    ]
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--detector", help="fitted or exported folder (default: a tiny PatchCore)")
  parser.add_argument("--requests", type=int, default=200, help="timed requests")
  parser.add_argument("--warmup", type=int, default=16, help="untimed requests first")
  parser.add_argument("--concurrency", type=int, default=8, help="client threads")
  parser.add_argument("--max-batch", type=int, default=8)
  parser.add_argument("--max-wait-ms", type=float, default=5.0)
  parser.add_argument("--queue-size", type=int, default=256)
  parser.add_argument("--image-size", type=int, default=256, help="side of the posted PNGs")
  parser.add_argument("--json", metavar="OUT", help="also write every figure to this file")
  args = parser.parse_args(argv)
  if min(args.requests, args.concurrency, args.max_batch, args.image_size) < 1:
    parser.error("--requests, --concurrency, --max-batch and --image-size must be >= 1.")
  result = run(args)
  print(report(result), flush=True)
  write_json(result, args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())

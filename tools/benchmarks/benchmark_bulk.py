"""Bulk scoring end to end: `configs/score.py` on a synthetic folder, 1 and 2 processes.

    python tools/benchmark.py --task bulk                 # the same as:
    python tools/benchmarks/benchmark_bulk.py --images 256 --models test,small --processes 1,2

For each model (`test`: the tiny 32 px unit-test MAE; `small`: 5.5M parameters at
224 px; random weights: speed only) and process count, a fresh work directory is scored
by the bulk job (`maeday_jax.jobs.score.run`) in fresh Python processes that find each
other through `jax.distributed` on 127.0.0.1 (one CPU device each). Reported: wall time
of the whole job (listing, compilation, scoring, commits, merge), images/s end to end,
each process's steady images/s from `summary.json`, and the share of the scoring time the
job waited for its input pipeline (`input_share`). The input pipeline alone
(decoding and resizing the same files with `maeday_jax.bulk.reader`) is timed first.
On a machine with accelerators, run it there (one process per host, `--distributed`)
with a real checkpoint instead; this tool measures what one CPU machine does.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from benchmark_common import use_checkout
from PIL import Image

_WORKER = """
import json, sys
import jax
port, pid, count, folder, workdir, variant, masks = sys.argv[1:8]
if int(count) > 1:
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(count), process_id=int(pid))
sys.path.insert(0, ".")
from configs import score
from maeday_jax.jobs import score as job
config = score.get_config("runlocal")
config.model.variant = variant
config.num_masks = int(masks)
config.data.path = folder
config.batch_size = 8
config.compilation_cache_dir = ""
job.run(config, workdir)
"""


def _write_images(folder: pathlib.Path, count: int) -> None:
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / f"img_{i:05d}.jpg", quality=90)


def _input_rate(folder: pathlib.Path, image_size: int, workers: int) -> float:
  use_checkout()
  from maeday_jax.bulk import reader

  paths = sorted(str(p) for p in folder.iterdir())
  start = time.perf_counter()
  batches = reader.read_batches(
    paths,
    8,
    image_size,
    first_batch=0,
    stop_batch=-(-len(paths) // 8),
    num_workers=workers,
    prefetch=2,
  )
  for _ in batches:
    pass
  return len(paths) / (time.perf_counter() - start)


def _run_job(folder, workdir, variant: str, masks: int, processes: int) -> dict:
  use_checkout()
  from tests.processes import start_processes

  start = time.perf_counter()
  args = (str(processes), str(folder), str(workdir), variant, str(masks))
  procs = start_processes(_WORKER, *args, num_processes=processes)
  outputs = [p.communicate()[0] for p in procs]
  wall = time.perf_counter() - start
  for pid, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    if p.returncode:
      raise RuntimeError(f"process {pid} failed:\n{out[-2000:]}")
  summary = json.loads((pathlib.Path(workdir) / "summary.json").read_text())
  return {"wall_s": wall, "summary": summary}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--models", default="test,small")
  parser.add_argument("--processes", default="1,2")
  parser.add_argument("--num-masks", type=int, default=32)
  parser.add_argument("--workers", type=int, default=4, help="decoding threads per process")
  parser.add_argument("--json", default="", help="also write the figures here")
  args = parser.parse_args(argv)
  load = os.getloadavg()
  print(
    f"bulk scoring benchmark: {platform.machine()}, {os.cpu_count()} CPUs, load average "
    f"{load[0]:.2f}; {args.images} synthetic 256 x 256 JPEGs, {args.num_masks} masks, "
    f"random weights; command: {' '.join(sys.argv)}"
  )
  sizes = {"test": 32, "small": 224}
  figures = {"input": {}, "jobs": []}
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp) / "images"
    _write_images(folder, args.images)
    for variant in args.models.split(","):
      rate = _input_rate(folder, sizes.get(variant, 224), args.workers)
      figures["input"][variant] = rate
      print(
        f"  input pipeline alone ({sizes.get(variant, 224)} px, {args.workers} threads): "
        f"{rate:.1f} images/s"
      )
    for variant in args.models.split(","):
      for count in (int(c) for c in args.processes.split(",")):
        workdir = pathlib.Path(tmp) / f"work_{variant}_{count}"
        result = _run_job(folder, workdir, variant, args.num_masks, count)
        per_process = [p.get("images_per_second") for p in result["summary"]["processes"]]
        input_share = result["summary"].get("input_share")
        rate = args.images / result["wall_s"]
        figures["jobs"].append(
          {
            "model": variant,
            "processes": count,
            "wall_s": result["wall_s"],
            "images_per_second": rate,
            "per_process": per_process,
            "input_share": input_share,
          }
        )
        print(
          f"  {variant}, {count} process(es): {result['wall_s']:.1f} s wall, "
          f"{rate:.2f} images/s end to end; per process: {json.dumps(per_process)}; "
          f"waiting for input {100 * (input_share or 0):.1f} % of the scoring time"
        )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(figures, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

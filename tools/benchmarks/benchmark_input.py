"""Input pipeline throughput: decode + resize + normalise per CPU core, as bulk scoring does.

    python tools/benchmark.py --task input               # every case, 1 and 2 threads
    python tools/benchmark.py --task input --seconds 5 --threads 1,2,4 --processes 2
    python tools/benchmarks/benchmark_input.py --seconds 5  # the same, without the entry point

Each case writes a few synthetic images of a realistic size and format to a temporary
folder, then times `maeday_jax.data.images.read_image` + `data.preprocess_image` (what
`maeday_jax.bulk.reader` runs per file) to the model's 224 x 224 input, single-threaded
(images/s per core) and in a thread pool of each `--threads` size (what the bulk reader
uses). Cases: magnetic-tile sized grayscale JPEGs (about 250 x 350), MVTec AD sized RGB
PNGs (1024 x 1024, the largest MVTec category size) and JPEGs of that size.

The report ends with how many host cores keep one accelerator busy at a given scoring
rate (`--target` images/s per chip; the default 200/s is ViT-L at 32 masks within 4x of
an H100's bfloat16 peak, from the 1.3 TFLOP-per-image count `tools/benchmark.py` prints).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np
from benchmark_common import use_checkout
from PIL import Image

use_checkout()

from maeday_jax.data import images as image_io  # noqa: E402
from maeday_jax.data import preprocess  # noqa: E402

CASES = {
  # name: (height, width, PIL mode, format, count)
  "tile_gray_jpeg_250x350": (250, 350, "L", "JPEG", 32),
  "mvtec_rgb_png_1024": (1024, 1024, "RGB", "PNG", 8),
  "mvtec_rgb_jpeg_1024": (1024, 1024, "RGB", "JPEG", 8),
}


def _write(folder: pathlib.Path, name: str, case) -> list[pathlib.Path]:
  h, w, mode, fmt, count = case
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    # Smooth content plus noise: compresses like a photograph, not like pure noise.
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(xx / (17 + i)) * np.cos(yy / 23)
    channels = 1 if mode == "L" else 3
    pixels = base[..., None] + rng.normal(0, 12, (h, w, channels))
    array = np.clip(pixels, 0, 255).astype(np.uint8)
    image = Image.fromarray(array[..., 0] if mode == "L" else array, mode)
    path = folder / f"{name}_{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
    image.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    paths.append(path)
  return paths


def _one(path: pathlib.Path, size: int) -> np.ndarray:
  return preprocess.preprocess_image(image_io.read_image(path), size)


def _rate(paths, size: int, workers: int, seconds: float, processes: bool = False) -> float:
  """Images per second over at least `seconds` of repeated passes over `paths`, decoded
  by a pool of `workers` threads (or processes, whose results travel back pickled)."""
  pool_type = (
    concurrent.futures.ProcessPoolExecutor if processes else concurrent.futures.ThreadPoolExecutor
  )
  with pool_type(workers) as pool:
    list(pool.map(_one, paths[:workers], [size] * workers))  # Start the workers.
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      list(pool.map(_one, paths, [size] * len(paths)))
      done += len(paths)
  return done / (time.perf_counter() - start)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case")
  parser.add_argument("--threads", default="1,2", help="thread-pool sizes to time")
  parser.add_argument("--processes", default="", help="process-pool sizes to time too")
  parser.add_argument("--size", type=int, default=224, help="model input size")
  parser.add_argument("--target", type=float, default=200.0, help="images/s per chip")
  args = parser.parse_args(argv)
  threads = [int(t) for t in args.threads.split(",")]
  processes = [int(t) for t in args.processes.split(",") if t]
  load = os.getloadavg()
  print(
    f"input pipeline benchmark: {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs, load average {load[0]:.2f}; read_image + preprocess_image "
    f"to {args.size} px; command: {' '.join(sys.argv)}"
  )
  per_core = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, case in CASES.items():
      paths = _write(pathlib.Path(tmp), name, case)
      _rate(paths[:2], args.size, 1, 0.2)  # Warm caches.
      rates = {t: _rate(paths, args.size, t, args.seconds) for t in threads}
      per_core[name] = rates[1] if 1 in rates else rates[min(rates)] / min(rates)
      cells = [f"{t} thread(s) {r:.1f} img/s" for t, r in rates.items()]
      for n in processes:
        cells.append(f"{n} process(es) {_rate(paths, args.size, n, args.seconds, True):.1f} img/s")
      print(f"  {name}: {', '.join(cells)}")
  print(f"cores per chip at {args.target:g} images/s (one decode per image, per-core rate):")
  for name, rate in per_core.items():
    print(f"  {name}: {args.target / rate:.1f} cores")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Per-image outputs written beside the scoring loop: maps, overlays, panels.

Writing runs in a small thread pool so the accelerator never waits for PNG encoding or
disk. A failure on one image is logged and recorded; the other images are unaffected.
"""

import concurrent.futures
import logging
import pathlib
import threading

import numpy as np

from maeday_jax import atomic_files, pictures
from maeday_jax.resizing import resize_maps_bilinear

log = logging.getLogger("maeday_jax")


def output_path(
  workdir: pathlib.Path, kind: str, category: str, file_name: str, suffix: str
) -> pathlib.Path:
  """Where the `kind` output ("maps", "overlays", ...) of one dataset file goes.

  `<workdir>/<kind>/<category>/<file_name><suffix>`: the file name keeps its folders and its
  own extension, and the output's suffix is appended (`good/000.jpg` -> `good/000.jpg.npz`),
  so `000.jpg` and `000.png` in one folder get outputs of their own. Backslashes count as
  folder separators; '..', empty and root parts are dropped so an output never lands
  outside `<workdir>/<kind>/<category>`.
  """
  posix = pathlib.PurePosixPath(file_name.replace("\\", "/"))
  parts = [p for p in posix.parts if p.strip("/") not in ("", "..")] or ["unnamed"]
  return pathlib.Path(workdir, kind, category, *parts[:-1], parts[-1] + suffix)


class OutputWriter:
  """Writes per-image outputs of one category under `workdir` in background threads.

  Layout (see `output_path`; `<file>` is the dataset file name with its extension):
  `maps/<category>/<file>.npz` (key `map`, float32, the image's own resolution),
  `overlays/<category>/<file>.png`, `panels/<category>/<file>.png`. Every file is written
  atomically: a run killed half way never leaves a truncated map or picture.
  """

  def __init__(self, workdir: pathlib.Path, category: str, num_threads: int = 2):
    self.workdir, self.category = workdir, category
    self._pool = concurrent.futures.ThreadPoolExecutor(num_threads)
    self._futures: list[concurrent.futures.Future] = []
    self._lock = threading.Lock()
    self.failures: list[tuple[str, str]] = []

  def path(self, kind: str, file_name: str, suffix: str) -> pathlib.Path:
    """The path of one output of this category; see `output_path`."""
    return output_path(self.workdir, kind, self.category, file_name, suffix)

  def _guarded(self, file_name: str, fn, *args):
    try:
      fn(*args)
    except Exception as e:  # One image's output must not stop the others.
      log.error("Could not write outputs for %s: %s", file_name, e)
      with self._lock:
        self.failures.append((file_name, f"{type(e).__name__}: {e}"))

  def submit(self, file_name: str, fn, *args) -> None:
    self._futures.append(self._pool.submit(self._guarded, file_name, fn, *args))

  def save_map(self, file_name: str, anomaly_map: np.ndarray, original_size) -> None:
    """Queues the map, upsampled to the image's own size, as a compressed array."""

    def write(anomaly_map, size):
      resized = resize_maps_bilinear(anomaly_map, size)
      path = self.path("maps", file_name, ".npz")
      with atomic_files.replace_when_done(path) as tmp, open(tmp, "xb") as f:
        np.savez_compressed(f, map=resized)

    self.submit(file_name, write, anomaly_map, tuple(int(s) for s in original_size))

  def load_map(self, file_name: str) -> np.ndarray:
    with np.load(self.path("maps", file_name, ".npz")) as f:
      return f["map"]

  def wait(self) -> None:
    """Blocks until every queued write has finished."""
    concurrent.futures.wait(self._futures)
    self._futures.clear()

  def close(self) -> None:
    self.wait()
    self._pool.shutdown()


def save_overlay_and_panel(
  writer: OutputWriter,
  example: dict,
  anomaly_map: np.ndarray,
  score: float,
  vmin: float,
  vmax: float,
  overlay: bool,
  panel: bool,
  threshold,
) -> None:
  """Overlay PNG and/or the image | ground truth | heatmap | predicted-mask panel."""
  name = example["file_name"]
  if overlay:
    pictures.save_overlay(
      writer.path("overlays", name, ".png"), example["image"], anomaly_map, vmin, vmax
    )
  if panel:
    has_truth = example["label"] == 1 or bool(np.any(example["mask"]))
    pictures.save_panel(
      writer.path("panels", name, ".png"),
      example["image"],
      anomaly_map,
      example["mask"] if has_truth or example["label"] == 0 else None,
      threshold,
      title=f"{name}  score {score:.4g}",
      vmin=vmin,
      vmax=vmax,
    )

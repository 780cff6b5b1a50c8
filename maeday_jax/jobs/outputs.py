"""Per-image outputs written beside the scoring loop: maps, overlays, panels.

Writing runs in a small thread pool so the accelerator never waits for PNG encoding or
disk. A failure on one image is logged and recorded; the other images are unaffected.
"""

import concurrent.futures
import contextlib
import logging
import os
import pathlib
import threading
from collections.abc import Iterable

import numpy as np

from maeday_jax import atomic_files, pictures
from maeday_jax.data import names
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

  A name that was not valid UTF-8 on disk reaches here escaped (`bad\\xff.png`, see
  `maeday_jax.data.names`): its output is named with the original bytes
  (`bad<0xff>.png.npz`), as the input was, while scores.csv and metrics.json show the
  escaped text. The escapes are undone before backslashes are read as separators.
  """
  posix = pathlib.PurePosixPath(names.to_disk(file_name).replace("\\", "/"))
  parts = [p for p in posix.parts if p.strip("/") not in ("", "..")] or ["unnamed"]
  folder = names.to_disk(category)
  return pathlib.Path(workdir, kind, folder, *parts[:-1], parts[-1] + suffix)


# The outputs written per image, by kind (the folder under the work directory): suffix.
PER_IMAGE_OUTPUTS = {
  "maps": ".npz",
  "overlays": ".png",
  "panels": ".png",
  "reconstructions": ".png",
}


def _is_temporary(name: str) -> bool:
  """An `atomic_files` temporary: maybe another process's output being written now."""
  return name.startswith(".") and atomic_files.TEMPORARY_MARKER in name


def remove_stale_outputs(
  workdir: pathlib.Path, category: str, file_names: Iterable[str]
) -> list[pathlib.Path]:
  """Deletes the per-image outputs of `category` whose image is not in `file_names`.

  A rerun in the same work directory rewrites the outputs of the images it scores; the
  maps, overlays, panels and reconstructions of images deleted from the folder since
  (or now skipped as unreadable) would otherwise stay beside them, as if scored. Only
  files under `<workdir>/<kind>/<category>/` are considered, and `atomic_files`
  temporaries are left (a run of the same work directory may be writing them); folders
  left empty are removed, up to `<workdir>/<kind>`, so no empty `maps/` stays behind.
  Call it while no process writes this category's outputs. A file that cannot be
  deleted is logged, not raised: the run's own outputs matter more.

  Returns:
    The files removed.
  """
  names_now = list(file_names)
  removed = []
  for kind, suffix in PER_IMAGE_OUTPUTS.items():
    root = pathlib.Path(workdir, kind, names.to_disk(category))
    if not root.is_dir():
      continue
    keep = {output_path(workdir, kind, category, n, suffix) for n in names_now}
    for parent, _, files in os.walk(root, topdown=False):
      for name in files:
        path = pathlib.Path(parent, name)
        if path in keep or _is_temporary(name):
          continue
        try:
          path.unlink()
          removed.append(path)
        except FileNotFoundError:
          pass
        except OSError as e:
          log.warning("Could not remove the stale output %s: %s", path, e)
      with contextlib.suppress(OSError):  # Only when empty: rmdir refuses otherwise.
        os.rmdir(parent)
    with contextlib.suppress(OSError):
      root.parent.rmdir()
  return removed


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

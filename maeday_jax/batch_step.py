"""Running a detector's score function over the devices: the one batch step.

Below evaluation and the bulk engine, which use it; `detectors.scoring` adds the
detector-level helpers (`score_images`, `normal_statistics`).

Every path that scores images (evaluation splits, the bulk job, normal statistics, a
notebook) goes through `score_local`: content ids of the images, the batch split over the
mesh, the compiled step, the results back as this process's NumPy rows.

    step = batch_step.compile_step(detector, mesh, global_batch=8)
    maps, scores = batch_step.score_arrays(step, detector.state, images, key, mesh)

A transductive detector's step takes one more argument, `valid` (B,) bool, sharded like
the images (see `Detector.transductive`): these functions build it (every row of a batch
given without one; `score_arrays` marks its padding invalid) and pass it only to such
steps (`is_transductive`), so callers hand every step the batch's `valid` alike.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from maeday_jax import parallel, zero_shot

_STEPS: dict = {}  # (detector.step_signature(), mesh, per-device batch) -> compiled step


def compile_step(detector: Any, mesh, global_batch: int):
  """`step(state, images, ids, key) -> (maps, scores)` of a `maeday_jax.detectors`
  detector, jitted data-parallel over `mesh`:
  state and key replicated, images, ids and outputs split over the batch axis.
  Transductive detectors: `step(state, images, ids, key, valid)`, `valid` split like the
  images (`is_transductive(step)` is then True).

  Detectors with the same `step_signature()` share one step (and its compilations).
  """
  native = detector.tiling is not None and detector.tiling.native
  # A native step's passes have a fixed size whatever the batch: one step per tiling.
  local = 0 if native else max(1, global_batch // mesh.devices.size)
  signature = detector.step_signature()
  cache_key = None if signature is None else (signature, detector.tiling, mesh, local)
  if cache_key is not None and cache_key in _STEPS:
    return _STEPS[cache_key]
  if native:
    from maeday_jax import tiling_native

    # Images of their own sizes: cut into tiles on the host, whatever the batch.
    step = tiling_native.compile_step(detector, mesh)
    if cache_key is not None:
      _STEPS[cache_key] = step
    return step
  score = detector.scoring_function(mesh, local)
  data, whole = parallel.batch_sharded(mesh), parallel.replicated(mesh)
  transductive = bool(detector.transductive)
  inputs = (whole, data, data, whole, *((data,) if transductive else ()))
  step = jax.jit(score, in_shardings=inputs, out_shardings=(data, data))
  # Read by `dispatch`: the callers (evaluation, the bulk job) hold only the step.
  step.transductive = transductive
  if cache_key is not None:
    _STEPS[cache_key] = step
  return step


def is_native(step) -> bool:
  """Whether a compiled step takes images of their own sizes (`tiling_native.NativeStep`):
  a sequence of (h, w, C) arrays, results as NumPy, maps at the tiling's `image_size`."""
  return bool(getattr(step, "native", False))


def is_transductive(step) -> bool:
  """Whether a compiled step (`compile_step`) takes the batch's `valid` rows."""
  return bool(getattr(step, "transductive", False))


def dispatch(step, replicated, local_images: np.ndarray, key, mesh, resize_fn=None, valid=None):
  """Starts scoring this process's rows of one global batch; returns the (maps, scores)
  device arrays without waiting for them (`parallel.to_local_numpy` fetches them).

  Each image's randomness comes from its content (`zero_shot.image_ids`), never from its
  position in the batch. `valid` (this process's rows, bool; None: all) reaches only a
  transductive step, which must leave the invalid rows (padding, unreadable files) out of
  the other rows' scores; other steps score every row on its own anyway. A native step
  (`is_native`) takes `local_images` as a sequence of images of any sizes (None for
  padding) and returns NumPy, having waited for its passes.
  """
  if is_native(step):
    return step(replicated, local_images, key, mesh, valid)
  ids = zero_shot.image_ids(local_images)
  if not is_transductive(step):
    images, ids = parallel.shard_batch((local_images, ids), mesh)
    if resize_fn is not None:
      images = resize_fn(images)
    return step(replicated, images, ids, key)
  valid = np.ones(len(local_images), bool) if valid is None else np.asarray(valid, bool)
  if valid.shape != (len(local_images),):
    raise ValueError(f"valid has shape {valid.shape}, the batch {len(local_images)} rows")
  images, ids, valid = parallel.shard_batch((local_images, ids, valid), mesh)
  if resize_fn is not None:
    images = resize_fn(images)
  return step(replicated, images, ids, key, valid)


def score_local(step, replicated, local_images: np.ndarray, key, mesh, resize_fn=None, valid=None):
  """(maps, scores) as NumPy for this process's rows of one global batch (`dispatch`)."""
  outputs = dispatch(step, replicated, local_images, key, mesh, resize_fn, valid)
  return parallel.to_local_numpy(outputs, mesh)


def score_arrays(step, replicated, images: np.ndarray, key, mesh, resize_fn=None):
  """Maps and scores of a few images this process holds (every process the same ones),
  padded to a multiple of the local devices; returns NumPy (N, H, W), (N,).

  A transductive detector scores the N images as one group: the padding is not in it, nor
  (on several processes) the other processes' copies of the images, which would be
  neighbours of themselves: process 0's rows are the group, and its results are sent to
  every process.
  """
  count = len(images)
  if is_native(step):
    return step(replicated, list(images), key, mesh)
  per_device = jax.local_device_count()
  padded = -(-max(count, 1) // per_device) * per_device
  batch = np.zeros((padded, *images.shape[1:]), np.float32)
  batch[:count] = images
  several = is_transductive(step) and jax.process_count() > 1
  valid = (np.arange(padded) < count) & (not several or jax.process_index() == 0)
  maps, scores = score_local(step, replicated, batch, key, mesh, resize_fn, valid)
  if several:
    maps, scores = multihost_utils.broadcast_one_to_all((maps, scores))
  return np.asarray(maps[:count]), np.asarray(scores[:count])

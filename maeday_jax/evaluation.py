"""Scoring a dataset split with MAEDAY, across every device and host, and its threshold.

    scoring = evaluation.Scoring.create(model, params, num_masks=32, batch_size=8)
    local = evaluation.score_split(scoring, split, on_map=save)   # this process's images
    scored = evaluation.gather_scored(local)                      # every process's images
    metrics = reports.category_metrics(scored.result)

`score_split` streams the split in fixed-size global batches (each process feeds its own
shard), scores them with one compiled data-parallel step, and keeps what the reports need:
names, labels and scores per image, and the pixel-metric tables (never every map). Each
scored map is handed to `on_map` (for example to write it to disk) as it arrives. The time
spent waiting for the input pipeline is measured (`ScoredSplit.input_wait_seconds`), and a
split held up by its input for more than a quarter of the time says so (`input_wait`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from maeday_jax import (
  batch_step,
  data,
  input_wait,
  memory_budget,
  metrics,
  parallel,
  reports,
  resizing,
  thresholds,
  zero_shot,
)
from maeday_jax.models import MaskedAutoencoder
from maeday_jax.weight_files import CheckpointError

# `on_map(file_name, anomaly_map, original_size)`: one scored image's map (model
# resolution) and the (height, width) of the image it came from.
MapCallback = Callable[[str, np.ndarray, tuple[int, int]], None]

THRESHOLD_METHODS = ("auto", "f1", "percentile", "fixed", "none")


def _input_resizer(size: int, mesh):
  """Resizes batch-sharded images on device to `size` (for models of another resolution)."""

  def resize(images):
    return jax.image.resize(
      images, (images.shape[0], size, size, images.shape[-1]), "linear", antialias=True
    )

  data_sharding = parallel.batch_sharded(mesh)
  return jax.jit(resize, in_shardings=data_sharding, out_shardings=data_sharding)


@dataclasses.dataclass(frozen=True)
class Scoring:
  """How images are scored: the model and its parameters, the compiled step, the batches.

  Attributes:
    model: the MAE (None for detectors without one, e.g. PatchCore: no reconstructions).
    params: its parameters as the caller holds them (for pictures on one process).
    replicated: the same parameters placed on every device of `mesh`.
    mesh: the 1-D data mesh the step runs on.
    score_fn: `score(replicated, images, ids, key) -> (maps, scores)`
      (`zero_shot.make_scorer`).
    key: the run's key; an image's masks come from it and the image's pixels
      (`zero_shot.image_keys`).
    batch_size: global batch (images), a multiple of the device count.
    image_size: the size images are read at; resized on device to the model's when it
      differs (pixel metrics of models of every resolution then use the same masks).
    eval_size: pixel-metric resolution (None: the maps' own).
    eval_original_max_side: > 0: pixel metrics at each mask's original size instead (its
      longer side capped at this; each map resized bilinearly to its mask); 0: eval_size.
    num_workers, prefetch: image decoding threads and batches read ahead.
    masking: the mask schedule, 'random' or 'stratified' (`zero_shot.image_noise`).
  """

  model: MaskedAutoencoder | None
  params: Any
  replicated: Any
  mesh: Any
  score_fn: Callable
  key: jax.Array
  batch_size: int
  image_size: int
  eval_size: int | None = None
  num_workers: int = 4
  prefetch: int = 2
  resize_fn: Callable | None = None
  masking: str = "random"
  name: str = ""  # What scores, for messages (a detector's description, a checkpoint).
  eval_original_max_side: int = 0
  # A `resizing.KeepAspect`: images read with their aspect ratio kept, for a step that
  # tiles each image at its own size (`tiling_native`; `tiling.resize_short_side`).
  aspect: Any = None

  @classmethod
  def create(
    cls,
    model: MaskedAutoencoder,
    params,
    *,
    num_masks: int = zero_shot.DEFAULT_NUM_MASKS,
    mask_ratio: float = zero_shot.DEFAULT_MASK_RATIO,
    batch_size: int = 8,
    key: jax.Array | None = None,
    mask_batch_size: int | None = None,
    image_size: int | None = None,
    eval_size: int | None = None,
    mesh=None,
    num_workers: int = 4,
    prefetch: int = 2,
    masking: str = "random",
  ) -> Scoring:
    """Compiles the scoring step for `model` and places `params` on every device.

    `mask_batch_size` None: chosen from the device's free memory
    (`memory_budget.mask_batch_size`; all masks in one pass when they fit).

    Raises:
      ValueError: `batch_size` does not divide over the devices.
    """
    mesh = parallel.data_mesh() if mesh is None else mesh
    parallel.local_batch_size(batch_size, mesh)  # Early error for a bad batch size.
    if mask_batch_size is None:
      mask_batch_size = memory_budget.mask_batch_size(
        model, batch_size // mesh.size, num_masks, mask_ratio, mesh.devices.flat[0]
      )
    image_size = image_size or model.img_size
    return cls(
      model=model,
      params=params,
      replicated=parallel.replicate(params, mesh),
      mesh=mesh,
      score_fn=zero_shot.make_scorer(model, mesh, num_masks, mask_ratio, mask_batch_size, masking),
      key=jax.random.key(0) if key is None else key,
      batch_size=batch_size,
      image_size=image_size,
      eval_size=eval_size,
      num_workers=num_workers,
      prefetch=prefetch,
      resize_fn=_input_resizer(model.img_size, mesh) if image_size != model.img_size else None,
      masking=masking,
    )

  @classmethod
  def for_detector(
    cls,
    detector,
    *,
    batch_size: int = 8,
    eval_size: int | None = None,
    mesh=None,
    num_workers: int = 4,
    prefetch: int = 2,
    eval_original_max_side: int = 0,
  ) -> Scoring:
    """Scoring with a fitted `maeday_jax.detectors` detector: its compiled step over
    `mesh`, its state on every device, images read at its input size, its own key."""
    from maeday_jax import batch_step

    mesh = parallel.data_mesh() if mesh is None else mesh
    parallel.local_batch_size(batch_size, mesh)  # Early error for a bad batch size.
    model, params = detector.reconstructor or (None, None)
    return cls(
      model=model,
      params=params,
      replicated=parallel.replicate(detector.state, mesh),
      mesh=mesh,
      score_fn=batch_step.compile_step(detector, mesh, batch_size),
      key=detector.scoring_key(),
      batch_size=batch_size,
      image_size=detector.read_size,
      eval_size=eval_size,
      num_workers=num_workers,
      prefetch=prefetch,
      masking=detector.settings.get("masking", "random"),
      name=detector.describe(),
      eval_original_max_side=eval_original_max_side,
      aspect=None if detector.tiling is None else detector.tiling.aspect,
    )


def _score_batch(scoring: Scoring, local_images: np.ndarray, valid: np.ndarray | None = None):
  """(maps, scores) of this process's rows of one batch (its images keyed by content).

  `valid`: the rows that are images (not padding); a transductive detector scores the
  batch's valid images as one group (`batch_step.dispatch`).
  """
  return batch_step.score_local(
    scoring.score_fn,
    scoring.replicated,
    local_images,
    scoring.key,
    scoring.mesh,
    scoring.resize_fn,
    valid,
  )


def score_images(scoring: Scoring, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Maps and scores of a few images this process holds (every process the same ones),
  e.g. held-out normals for normalisation statistics; returns NumPy (N, H, W), (N,).
  A transductive detector scores them as one group (`batch_step.score_arrays`)."""
  return batch_step.score_arrays(
    scoring.score_fn, scoring.replicated, images, scoring.key, scoring.mesh, scoring.resize_fn
  )


def _check_finite(scoring: Scoring, batch: dict, maps, batch_scores, valid) -> None:
  """Refuses a batch with NaN or infinite maps or scores before anything uses them (the
  pixel metrics would otherwise fail on them with a bare ValueError).

  Raises:
    CheckpointError: naming what scores (`scoring.name`) and the first affected image.
  """
  rows = np.flatnonzero(valid)
  if not len(rows):
    return
  maps_ok = np.isfinite(np.asarray(maps)[rows]).reshape(len(rows), -1).all(axis=1)
  bad = ~(maps_ok & np.isfinite(np.asarray(batch_scores)[rows]))
  if bad.any():
    first = batch["file_name"][rows[np.flatnonzero(bad)[0]]]
    raise CheckpointError(
      f"{scoring.name or 'The model'} gives NaN or infinite anomaly maps (first for "
      f"{first}, in {int(bad.sum())} of this batch's {len(rows)} images): its weights are "
      "corrupt, diverged or overflow in this dtype. Check the checkpoint or detector, or "
      "use --config.model.dtype=float32."
    )


def _add_at_original_size(accumulator, maps, original_masks, rows) -> None:
  """Each row's map resized (bilinear) to its mask's original size, pooled one by one."""
  for i in np.flatnonzero(rows):
    mask = original_masks[i]
    accumulator.add(resizing.resize_maps_bilinear(np.asarray(maps[i]), mask.shape), mask)


@dataclasses.dataclass
class ScoredSplit:
  """What scoring one split produced: this process's examples, or (`gather_scored`) all."""

  result: reports.CategoryResult
  indices: np.ndarray  # Split index of each scored example.
  seconds: float
  # Of `seconds`, those spent waiting for the input pipeline (`input_wait`).
  input_wait_seconds: float = 0.0


def score_split(
  scoring: Scoring,
  split: data.Split,
  *,
  on_map: MapCallback | None = None,
  pixel_metrics: bool = True,
  desc: str = "",
  progress: bool = True,
) -> ScoredSplit:
  """Scores every example of this process's shard of `split` in fixed-size batches.

  Pixel metrics are accumulated for labelled examples when the split has masks
  (`result.pixels` is None otherwise, or when `pixel_metrics` is off). A transductive
  detector scores each global batch's examples as one group (its padding left out).
  """
  local_batch = parallel.local_batch_size(scoring.batch_size, scoring.mesh)
  accumulator = metrics.PixelMetricAccumulator(resolution=scoring.eval_size)
  names, labels, scores, indices, has_mask = [], [], [], [], False
  start = time.perf_counter()
  bar = tqdm(
    total=len(split),
    desc=desc or str(split),
    unit="img",
    dynamic_ncols=True,
    disable=not progress,
  )
  read = data.batches(
    split,
    local_batch,
    scoring.image_size,
    num_workers=scoring.num_workers,
    prefetch=scoring.prefetch,
    original_masks=scoring.eval_original_max_side if pixel_metrics else 0,
    aspect=scoring.aspect,
  )
  with bar, input_wait.watched(read, scoring.num_workers, str(split)) as batches:
    for batch in batches:
      valid = batch["valid"]
      maps, batch_scores = _score_batch(scoring, batch["image"], valid)
      _check_finite(scoring, batch, maps, batch_scores, valid)
      for i in np.flatnonzero(valid):
        names.append(batch["file_name"][i])
        labels.append(int(batch["label"][i]))
        scores.append(float(batch_scores[i]))
        indices.append(int(batch["index"][i]))
        if on_map is not None:
          on_map(batch["file_name"][i], maps[i], tuple(int(s) for s in batch["original_size"][i]))
      labelled = valid & (batch["label"] >= 0)
      if pixel_metrics and labelled.any():
        has_mask |= bool(batch["mask"][labelled].any())
        if scoring.eval_original_max_side:
          _add_at_original_size(accumulator, maps, batch["mask_original"], labelled)
        else:
          accumulator.add(maps[labelled], batch["mask"][labelled])
      bar.update(int(valid.sum()))
  seconds = time.perf_counter() - start
  result = reports.CategoryResult(
    category=split.category,
    file_names=names,
    labels=np.asarray(labels, np.int64),
    scores=np.asarray(scores, np.float64),
    pixels=accumulator if has_mask else None,
  )
  return ScoredSplit(result, np.asarray(indices, np.int64), seconds, batches.waited)


def gather_scored(scored: ScoredSplit) -> ScoredSplit:
  """Every process's examples of a split, in split order, on every process.

  Image scores, labels and names are concatenated; the pixel-metric tables are merged.
  A collective (every process must call it); with one process, `scored` itself.
  """
  if jax.process_count() == 1:
    return scored
  result = scored.result
  local = {
    "indices": scored.indices,
    "labels": result.labels,
    "scores": result.scores,
    "file_names": np.asarray(result.file_names, dtype=str),
    "seconds": np.float64(scored.seconds),
    "input_wait_seconds": np.float64(scored.input_wait_seconds),
  }
  if result.pixels is not None:
    local.update({f"pixels.{k}": v for k, v in result.pixels.to_arrays().items()})
  parts = parallel.allgather_arrays(local)
  indices = np.concatenate([p["indices"] for p in parts])
  order = np.argsort(indices, kind="stable")
  pixels = None
  for part in parts:
    if "pixels.keys" not in part:
      continue  # That process's shard had no masks.
    table = {k.removeprefix("pixels."): v for k, v in part.items() if k.startswith("pixels.")}
    shard = metrics.PixelMetricAccumulator.from_arrays(table)
    if pixels is None:
      pixels = shard
    else:
      pixels.merge(shard)
  names = np.concatenate([p["file_names"].astype(str) for p in parts])
  gathered = reports.CategoryResult(
    category=result.category,
    file_names=[str(n) for n in names[order]],
    labels=np.concatenate([p["labels"] for p in parts])[order],
    scores=np.concatenate([p["scores"] for p in parts])[order],
    pixels=pixels,
    seed=result.seed,
  )
  # The split took as long as its slowest process, and waited for input as long as it did.
  slowest = max(parts, key=lambda p: float(p["seconds"]))
  seconds, waited = float(slowest["seconds"]), float(slowest["input_wait_seconds"])
  return ScoredSplit(gathered, indices[order], seconds, waited)


def choose_threshold(
  settings: ml_collections.ConfigDict,
  result: reports.CategoryResult,
  score_normals: Callable[[], np.ndarray],
  has_normal_references: bool,
) -> tuple[thresholds.Threshold | None, str]:
  """The decision threshold for one category, and why.

  `settings`: `config.threshold` (method auto|f1|percentile|fixed|none, percentile,
  value; see `configs/zero_shot.py`). `score_normals()` returns the scores of the normal
  references, called only when the percentile method needs them; `has_normal_references`
  says whether the user gave any (what `auto` falls back to without both test classes).
  """
  method, labels = settings.method, result.labels
  both_classes = (labels == 0).any() and (labels == 1).any()
  if method == "auto":
    method = "f1" if both_classes else ("percentile" if has_normal_references else "none")
  if method == "none":
    return None, "no threshold (no labelled anomalies and no normal references)"
  if method == "fixed":
    return thresholds.fixed_threshold(settings.value), "fixed by the configuration"
  if method == "f1":
    if not both_classes:
      return None, "threshold.method=f1 needs normal and anomalous labelled images"
    return thresholds.f1_threshold(result.scores, labels), "F1-optimal on the test labels"
  return (
    thresholds.percentile_threshold(score_normals(), settings.percentile),
    f"{settings.percentile:g}th percentile of normal reference scores",
  )

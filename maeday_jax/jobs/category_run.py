"""One category of a scoring job: score its test split, threshold, draw, measure.

Shared by the zero-shot and few-shot jobs. Each process scores and draws its own images;
thresholds, metrics, ROC curves and reconstructions use every process's images.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maeday_jax import (
  data,
  evaluation,
  input_wait,
  parallel,
  pictures,
  reports,
  thresholds,
  zero_shot,
)
from maeday_jax.checkpoints import CheckpointError
from maeday_jax.data import names
from maeday_jax.jobs.outputs import (
  OutputWriter,
  output_path,
  remove_stale_outputs,
  save_overlay_and_panel,
)

log = logging.getLogger("maeday_jax")

_MIN_TILE = 160  # Pixels: the smallest tile drawn in reconstruction panels.


@dataclasses.dataclass
class CategoryOutcome:
  """Everything one category's evaluation produced."""

  result: reports.CategoryResult
  metrics: dict
  threshold: thresholds.Threshold | None
  notes: dict
  timing: dict
  splits: list


def color_range(scores: np.ndarray, threshold) -> tuple[float, float]:
  """(vmin, vmax) of a category's one colour scale: with a threshold, from the lowest of 0
  and the scores to as far above the threshold (it sits mid-scale, also when it is
  negative, as for standardised ensembles); without, 0 to the 99th percentile."""
  if threshold is not None:
    value = float(threshold.value)
    low = min(0.0, float(np.min(scores))) if scores.size else 0.0
    if low >= value:  # Every score above a negative threshold.
      low = value - abs(value) - 1.0
    return low, 2.0 * value - low
  return 0.0, float(np.percentile(scores, 99)) if scores.size else 1.0


def showcase_order(result: reports.CategoryResult) -> np.ndarray:
  """Positions to illustrate first: anomalous images, then by decreasing score."""
  return np.lexsort((-result.scores, (result.labels != 1).astype(int)))


def write_pictures(writer, split, scored, threshold, outputs, all_scores=None) -> None:
  """Overlays for every image of `scored` and panels for a sample, on one colour scale.

  `outputs`: `config.outputs`. `all_scores`: the scores of every process's images, which
  set the colour scale (default: `scored`'s own).
  """
  all_scores = scored.result.scores if all_scores is None else all_scores
  vmin, vmax = color_range(all_scores, threshold)
  panel_budget = len(scored.indices) if outputs.panels < 0 else outputs.panels
  order = showcase_order(scored.result)
  panel_set = set(order[:panel_budget].tolist())
  for position, index in enumerate(scored.indices):
    want_panel = position in panel_set
    if not (outputs.overlays or want_panel):
      continue

    def render(index=int(index), position=position, want_panel=want_panel):
      example = split[index]
      anomaly_map = writer.load_map(example["file_name"])
      save_overlay_and_panel(
        writer,
        example,
        anomaly_map,
        float(scored.result.scores[position]),
        vmin,
        vmax,
        outputs.overlays,
        want_panel,
        threshold,
      )

    writer.submit(split.file_name(int(index)), render)
  writer.wait()


def write_reconstructions(
  scoring: evaluation.Scoring, split, scored, count: int, mask_ratio: float, workdir
) -> None:
  """Masked inputs and reconstructions for a few images: what the MAE 'expects'."""
  count = min(count, len(scored.indices))
  if count <= 0 or scoring.model is None:  # Only an MAE reconstructs.
    return
  model, params = scoring.model, scoring.params
  order = showcase_order(scored.result)[:count]
  num_masks = 3
  for position in order:
    index = int(scored.indices[position])
    example = data.load_example(split, index, model.img_size)
    image = jnp.asarray(example["image"])[None]
    keys = zero_shot.image_keys(scoring.key, zero_shot.image_ids(example["image"][None]))
    noise = zero_shot.image_noise(keys, num_masks, model.num_patches, mask_ratio, scoring.masking)
    recon, hidden = zero_shot.reconstructions(model, params, image, noise, mask_ratio)
    # Small models get their tiles enlarged (nearest) so captions stay readable.
    zoom = -(-_MIN_TILE // model.img_size)

    def enlarge(x, zoom=zoom):
      return np.repeat(np.repeat(np.asarray(x), zoom, axis=0), zoom, axis=1)

    original = enlarge(data.denormalize(np.asarray(image[0])))
    recon_u8 = [enlarge(data.denormalize(np.asarray(r))) for r in recon[0]]
    masked = [
      np.where(enlarge(h)[..., None] > 0, 127, original).astype(np.uint8) for h in hidden[0]
    ]
    error = enlarge(jnp.sum((image[0] - recon[0]) ** 2, axis=-1).mean(axis=0))
    name = example["file_name"]
    path = output_path(workdir, "reconstructions", split.category, name, ".png")
    pictures.save_reconstruction_panel(path, original, masked, recon_u8, error, title=name)


def check_finite(result: reports.CategoryResult, model_name: str) -> None:
  """Refuses NaN or infinite scores: the model, not the data, is broken.

  Raises:
    CheckpointError: naming the model, the category and a few affected images.
  """
  bad = ~np.isfinite(result.scores)
  if bad.any():
    names = [result.file_names[i] for i in np.flatnonzero(bad)[:3]]
    raise CheckpointError(
      f"The model {model_name} gives NaN or infinite anomaly maps for {int(bad.sum())} of "
      f"{bad.size} images of {result.category} (e.g. {', '.join(names)}): its weights are "
      "corrupt or overflow in this dtype. Check the checkpoint, or use "
      "--config.model.dtype=float32."
    )


def run_category(
  scoring: evaluation.Scoring,
  category: str,
  config: ml_collections.ConfigDict,
  workdir: pathlib.Path,
  seed: int | None = None,
) -> CategoryOutcome:
  """Scores a category's test split, chooses its threshold, writes its pictures.

  On a rerun of the same work directory, the per-image outputs of images no longer in the
  split (deleted, or now skipped) are removed first (`outputs.remove_stale_outputs`).

  `config`: the job config (`data`, `threshold`, `outputs`, `mask_ratio`); `seed`: the
  shot selection of a few-shot run, None for zero-shot.
  """
  split = data.load_split(config.data, category, "test")
  splits = [split]
  if jax.process_index() == 0:
    # A rerun of this work directory: outputs of images no longer in the split go first.
    removed = remove_stale_outputs(workdir, category, map(split.file_name, range(len(split))))
    if removed:
      log.warning(
        "%s: removed %d output file(s) of images no longer in %s (e.g. %s)",
        workdir,
        len(removed),
        split,
        names.to_text(removed[0].relative_to(workdir)),
      )
  # No process writes an output before the stale ones are gone (and their folders).
  parallel.barrier(f"maeday_jax: removed stale outputs of {category}")
  writer = OutputWriter(workdir, category)
  local = evaluation.score_split(scoring, split, on_map=writer.save_map, desc=category)
  local.result.seed = seed
  writer.wait()
  # Thresholds, metrics and reports need every process's images; each process draws
  # its own images' pictures.
  scored = evaluation.gather_scored(local)
  check_finite(scored.result, scoring.name or config.model.checkpoint)

  def score_normals():
    normals = data.load_split(config.data, category, "train")
    splits.append(normals)
    desc = f"{category} (normal references)"
    scored_normals = evaluation.score_split(scoring, normals, pixel_metrics=False, desc=desc)
    return evaluation.gather_scored(scored_normals).result.scores

  threshold, why = evaluation.choose_threshold(
    config.threshold, scored.result, score_normals, bool(config.data.normal_path)
  )
  notes = {"threshold": why, **({"value": threshold.value} if threshold else {})}
  write_pictures(writer, split, local, threshold, config.outputs, scored.result.scores)
  if jax.process_index() == 0:
    write_reconstructions(
      scoring, split, scored, config.outputs.reconstructions, config.mask_ratio, workdir
    )
    if config.outputs.roc and (scored.result.labels >= 0).any():
      roc = workdir / "roc" / f"{names.to_disk(category)}.png"
      pictures.save_roc_curve(roc, scored.result.scores, scored.result.labels, category)
  writer.close()
  if writer.failures:
    notes["output_failures"] = writer.failures
  timing = {
    "images": len(scored.indices),
    "seconds": scored.seconds,
    "images_per_second": len(scored.indices) / max(scored.seconds, 1e-9),
    "input_wait_seconds": scored.input_wait_seconds,
    "input_share": input_wait.share(scored.input_wait_seconds, scored.seconds),
  }
  metrics = reports.category_metrics(scored.result)
  return CategoryOutcome(scored.result, metrics, threshold, notes, timing, splits)

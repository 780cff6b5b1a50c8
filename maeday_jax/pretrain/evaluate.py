"""Zero-shot MAEDAY evaluation of a (pre-trained) MAE on one split of a dataset.

Images are read at `eval_size` (224, the project's evaluation resolution) and, for a
model trained at another resolution, resized on device to the model's input; the maps
come back to `eval_size` bilinearly, so pixel metrics of models of every resolution are
computed against the same masks.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from maeday_jax import data, evaluation, reports, zero_shot
from maeday_jax.models import MaskedAutoencoder

logger = logging.getLogger(__name__)

_REPORTED = ("image_auroc", "pixel_auroc", "aupro")


def evaluate_split(
  model: MaskedAutoencoder,
  params,
  split: data.Split,
  *,
  num_masks: int = zero_shot.DEFAULT_NUM_MASKS,
  mask_ratio: float = zero_shot.DEFAULT_MASK_RATIO,
  batch_size: int = 8,
  eval_size: int = 224,
  seed: int = 0,
  mesh=None,
  mask_batch_size: int | None = None,
  progress: bool = False,
) -> dict:
  """Image AUROC, pixel AUROC and AUPRO of zero-shot scoring on one split.

  Returns a dict with the three metrics (None with a note when undefined, e.g. a split
  without anomalies), the number of images and the seconds spent.
  """
  scoring = evaluation.Scoring.create(
    model,
    params,
    num_masks=num_masks,
    mask_ratio=mask_ratio,
    batch_size=batch_size,
    key=jax.random.key(seed),
    mask_batch_size=mask_batch_size,
    image_size=eval_size,
    eval_size=eval_size,
    mesh=mesh,
  )
  scored = evaluation.gather_scored(
    evaluation.score_split(scoring, split, desc=f"score {split}", progress=progress)
  )
  measured = reports.category_metrics(scored.result)
  result = {
    "num_images": len(scored.indices),
    "seconds": round(scored.seconds, 1),
    "notes": [
      f"{name} is undefined: {measured['notes'][name]}"
      for name in _REPORTED
      if measured[name] is None
    ],
  }
  result.update({name: measured[name] for name in _REPORTED})
  return result


def evaluate_zero_shot(
  model: MaskedAutoencoder, params, data_config, split: str = "test", **options
) -> dict:
  """`evaluate_split` on every category `data_config` selects, plus their mean.

  Returns `{"categories": {category: result}, "mean": {metric: value}}`; `options`
  are those of `evaluate_split`.
  """
  results = {}
  for category in data.resolve_categories(data_config):
    results[category] = evaluate_split(
      model, params, data.load_split(data_config, category, split), **options
    )
    logger.info("zero-shot %s/%s: %s", data_config.name, category, results[category])
  mean = {}
  for name in _REPORTED:
    values = [r[name] for r in results.values() if r[name] is not None]
    mean[name] = float(np.mean(values)) if values else None
  return {"categories": results, "mean": mean}

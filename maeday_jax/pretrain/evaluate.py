"""Zero-shot MAEDAY evaluation of a (pre-trained) MAE on one split of a dataset.

Images are read at `eval_size` (224, the project's evaluation resolution) and, for a
model trained at another resolution, resized on device to the model's input; the maps
come back to `eval_size` bilinearly, so pixel metrics of models of every resolution are
computed against the same masks.
"""

from __future__ import annotations

import logging
import time

import jax
import numpy as np
import tqdm

from maeday_jax import data, metrics, parallel, zero_shot
from maeday_jax.models import MaskedAutoencoder

logger = logging.getLogger(__name__)


def _resizer(size: int, mesh):
  def resize(images):
    return jax.image.resize(
      images, (images.shape[0], size, size, images.shape[-1]), "linear", antialias=True
    )

  data_sharding = parallel.batch_sharded(mesh)
  return jax.jit(resize, in_shardings=data_sharding, out_shardings=data_sharding)


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
  mesh = parallel.data_mesh() if mesh is None else mesh
  parallel.local_batch_size(batch_size, mesh)
  scorer = zero_shot.make_scorer(model, mesh, num_masks, mask_ratio, mask_batch_size)
  resize = _resizer(model.img_size, mesh) if model.img_size != eval_size else None
  replicated = parallel.replicate(params, mesh)
  key = jax.random.key(seed)
  accumulator = metrics.PixelMetricAccumulator(resolution=eval_size)
  scores, labels = [], []
  start = time.perf_counter()
  local = batch_size // jax.process_count()
  batches = data.batches(split, local, eval_size)
  for batch in tqdm.tqdm(batches, desc=f"score {split}", disable=not progress, leave=False):
    images = parallel.shard_batch(batch["image"], mesh)
    indices = parallel.shard_batch(batch["index"], mesh)
    if resize is not None:
      images = resize(images)
    maps, image_scores = parallel.to_local_numpy(scorer(replicated, images, indices, key), mesh)
    valid = batch["valid"]
    scores.append(image_scores[valid])
    labels.append(batch["label"][valid])
    accumulator.add(maps[valid], batch["mask"][valid])
  seconds = time.perf_counter() - start
  scores, labels = np.concatenate(scores), np.concatenate(labels)
  result = {"num_images": int(scores.size), "seconds": round(seconds, 1), "notes": []}
  measures = {
    "image_auroc": lambda: metrics.image_auroc(scores, labels),
    "pixel_auroc": accumulator.auroc,
    "aupro": accumulator.aupro,
  }
  for name, measure in measures.items():
    try:
      result[name] = measure()
    except metrics.MetricUndefinedError as e:
      result[name] = None
      result["notes"].append(str(e))
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
  for name in ("image_auroc", "pixel_auroc", "aupro"):
    values = [r[name] for r in results.values() if r[name] is not None]
    mean[name] = float(np.mean(values)) if values else None
  return {"categories": results, "mean": mean}

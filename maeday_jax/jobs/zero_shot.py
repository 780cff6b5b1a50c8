"""The zero-shot job: score every test image of every category, then evaluate and report.

    python -m maeday_jax.main --config configs/zero_shot.py --workdir runs/zero_shot

Outputs under the work directory:
  scores.csv                 file, category, label, score (and predicted label)
  maps/<category>/...npz     pixel maps at each image's own resolution (key `map`)
  overlays/<category>/...png heatmap overlays; panels/<category>/...png for a sample
  reconstructions/<category>/...png  masked inputs and their reconstructions
  roc/<category>.png         image ROC curves (labelled data)
  metrics.json, metrics.md   metrics per category and means (when labels exist)
  config.json                the resolved configuration
"""

import dataclasses
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from maeday_jax import data, metrics, parallel, pictures, reports, thresholds, zero_shot
from maeday_jax.jobs import common
from maeday_jax.jobs.outputs import OutputWriter, save_overlay_and_panel

log = logging.getLogger("maeday_jax")

_MIN_TILE = 160  # Pixels: the smallest tile drawn in reconstruction panels.


@dataclasses.dataclass
class ScoredSplit:
  """What scoring one split produced: this process's examples, or (`gather_scored`) all."""

  result: reports.CategoryResult
  indices: np.ndarray  # Split index of each scored example.
  seconds: float


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the scoring settings before any long work starts."""
  common.require(config.num_masks >= 1, "num_masks", f"must be >= 1, got {config.num_masks}.")
  common.require(
    0.0 <= config.mask_ratio < 1.0, "mask_ratio", f"must be in [0, 1), got {config.mask_ratio}."
  )
  common.require(config.batch_size >= 1, "batch_size", f"must be >= 1, got {config.batch_size}.")
  common.require(
    config.threshold.method in ("auto", "f1", "percentile", "fixed", "none"),
    "threshold.method",
    f"{config.threshold.method!r} is not one of auto, f1, percentile, fixed, none.",
  )


def score_split(
  model,
  params,
  split: data.Split,
  config: ml_collections.ConfigDict,
  scorer,
  mesh,
  key: jax.Array,
  writer: OutputWriter | None = None,
  pixel_metrics: bool = True,
  desc: str = "",
) -> ScoredSplit:
  """Scores every example of this process's shard of `split` in fixed-size batches."""
  local_batch = parallel.local_batch_size(config.batch_size, mesh)
  accumulator = metrics.PixelMetricAccumulator(resolution=config.eval_size or None)
  names, labels, scores, indices, has_mask = [], [], [], [], False
  start = time.perf_counter()
  with tqdm(total=len(split), desc=desc or str(split), unit="img", dynamic_ncols=True) as bar:
    for batch in data.batches(
      split,
      local_batch,
      model.img_size,
      num_workers=config.data.num_workers,
      prefetch=config.data.prefetch,
    ):
      images, index = parallel.shard_batch((batch["image"], batch["index"]), mesh)
      maps, batch_scores = parallel.to_local_numpy(scorer(params, images, index, key), mesh)
      valid = batch["valid"]
      for i in np.flatnonzero(valid):
        names.append(batch["file_name"][i])
        labels.append(int(batch["label"][i]))
        scores.append(float(batch_scores[i]))
        indices.append(int(batch["index"][i]))
        if writer is not None:
          writer.save_map(batch["file_name"][i], maps[i], batch["original_size"][i])
      labelled = valid & (batch["label"] >= 0)
      if pixel_metrics and labelled.any():
        has_mask |= bool(batch["mask"][labelled].any())
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
  return ScoredSplit(result, np.asarray(indices, np.int64), seconds)


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
  # The split took as long as its slowest process.
  seconds = max(float(p["seconds"]) for p in parts)
  return ScoredSplit(gathered, indices[order], seconds)


def choose_threshold(
  config, scored: ScoredSplit, score_normals
) -> tuple[thresholds.Threshold | None, str]:
  """The decision threshold for one category, and why (see configs/zero_shot.py)."""
  method, labels = config.threshold.method, scored.result.labels
  both_classes = (labels == 0).any() and (labels == 1).any()
  if method == "auto":
    method = "f1" if both_classes else ("percentile" if config.data.normal_path else "none")
  if method == "none":
    return None, "no threshold (no labelled anomalies and no normal references)"
  if method == "fixed":
    return thresholds.fixed_threshold(config.threshold.value), "fixed by the configuration"
  if method == "f1":
    if not both_classes:
      return None, "threshold.method=f1 needs normal and anomalous labelled images"
    return thresholds.f1_threshold(scored.result.scores, labels), "F1-optimal on the test labels"
  normal_scores = score_normals()
  return (
    thresholds.percentile_threshold(normal_scores, config.threshold.percentile),
    f"{config.threshold.percentile:g}th percentile of normal reference scores",
  )


def _color_range(scores: np.ndarray, threshold) -> tuple[float, float]:
  # One colour scale per category: the threshold sits mid-scale when there is one.
  if threshold is not None:
    return 0.0, 2.0 * float(threshold.value)
  return 0.0, float(np.percentile(scores, 99)) if scores.size else 1.0


def showcase_order(result: reports.CategoryResult) -> np.ndarray:
  """Positions to illustrate first: anomalous images, then by decreasing score."""
  return np.lexsort((-result.scores, (result.labels != 1).astype(int)))


def write_pictures(writer, split, scored, threshold, config, all_scores=None) -> None:
  """Overlays for every image of `scored` and panels for a sample, on one colour scale.

  `all_scores`: the scores of every process's images, which set the colour scale
  (default: `scored`'s own).
  """
  out = config.outputs
  all_scores = scored.result.scores if all_scores is None else all_scores
  vmin, vmax = _color_range(all_scores, threshold)
  panel_budget = len(scored.indices) if out.panels < 0 else out.panels
  order = showcase_order(scored.result)
  panel_set = set(order[:panel_budget].tolist())
  for position, index in enumerate(scored.indices):
    want_panel = position in panel_set
    if not (out.overlays or want_panel):
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
        out.overlays,
        want_panel,
        threshold,
      )

    writer.submit(split.file_name(int(index)), render)
  writer.wait()


def write_reconstructions(model, params, split, scored, config, key, workdir) -> None:
  """Masked inputs and reconstructions for a few images: what the MAE 'expects'."""
  count = min(config.outputs.reconstructions, len(scored.indices))
  if count <= 0:
    return
  order = showcase_order(scored.result)[:count]
  num_masks = 3
  for position in order:
    index = int(scored.indices[position])
    example = data.load_example(split, index, model.img_size)
    image = jnp.asarray(example["image"])[None]
    keys = zero_shot.example_keys(key, jnp.asarray([index]))
    noise = zero_shot.image_noise(keys, num_masks, model.num_patches)
    recon, hidden = zero_shot.reconstructions(model, params, image, noise, config.mask_ratio)
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
    name = pathlib.PurePosixPath(example["file_name"])
    path = workdir / "reconstructions" / split.category / name.with_suffix(".png")
    pictures.save_reconstruction_panel(path, original, masked, recon_u8, error, title=str(name))


@dataclasses.dataclass
class CategoryOutcome:
  """Everything one category's evaluation produced."""

  result: reports.CategoryResult
  metrics: dict
  threshold: thresholds.Threshold | None
  notes: dict
  timing: dict
  splits: list


def evaluate_category(
  model, params, replicated, category: str, config, scorer, mesh, key, workdir, seed=None
) -> CategoryOutcome:
  """Scores a category's test split, chooses its threshold, writes its pictures."""
  split = data.load_split(config.data, category, "test")
  splits = [split]
  writer = OutputWriter(workdir, category)
  local = score_split(model, replicated, split, config, scorer, mesh, key, writer, desc=category)
  local.result.seed = seed
  writer.wait()
  # Thresholds, metrics and reports need every process's images; each process draws
  # its own images' pictures.
  scored = gather_scored(local)

  def score_normals():
    normals = data.load_split(config.data, category, "train")
    splits.append(normals)
    desc = f"{category} (normal references)"
    scored_normals = score_split(
      model, replicated, normals, config, scorer, mesh, key, pixel_metrics=False, desc=desc
    )
    return gather_scored(scored_normals).result.scores

  threshold, why = choose_threshold(config, scored, score_normals)
  notes = {"threshold": why, **({"value": threshold.value} if threshold else {})}
  write_pictures(writer, split, local, threshold, config, all_scores=scored.result.scores)
  if jax.process_index() == 0:
    write_reconstructions(model, params, split, scored, config, key, workdir)
    if config.outputs.roc and (scored.result.labels >= 0).any():
      pictures.save_roc_curve(
        workdir / "roc" / f"{category}.png", scored.result.scores, scored.result.labels, category
      )
  writer.close()
  if writer.failures:
    notes["output_failures"] = writer.failures
  timing = {
    "images": len(scored.indices),
    "seconds": scored.seconds,
    "images_per_second": len(scored.indices) / max(scored.seconds, 1e-9),
  }
  metrics_ = reports.evaluate_category(scored.result)
  return CategoryOutcome(scored.result, metrics_, threshold, notes, timing, splits)


def make_model_scorer(model, config):
  """The mesh and the compiled scorer for `model` under `config` (checks the batch size)."""
  mesh = parallel.data_mesh()
  parallel.local_batch_size(config.batch_size, mesh)  # Early error for a bad batch size.
  scorer = zero_shot.make_scorer(
    model, mesh, config.num_masks, config.mask_ratio, config.mask_batch_size or None
  )
  return mesh, scorer


def summarize_outcomes(outcomes: dict[str, CategoryOutcome], dataset: str, seed=None) -> dict:
  """The report summary of per-category outcomes, with thresholds, timing and skips."""
  summary = reports.summarize({c: o.metrics for c, o in outcomes.items()}, dataset, seed=seed)
  summary["thresholds"] = {c: o.notes for c, o in outcomes.items()}
  summary["timing"] = {c: o.timing for c, o in outcomes.items()}
  summary["skipped"] = [
    {"split": str(s), "path": p, "reason": r}
    for o in outcomes.values()
    for s in o.splits
    for p, r in s.skipped
  ]
  return summary


def write_category_reports(workdir, outcomes: dict[str, CategoryOutcome]) -> None:
  """scores.csv with predicted labels where a category has a threshold."""
  reports.write_scores_csv(
    workdir / "scores.csv",
    [o.result for o in outcomes.values()],
    threshold={c: o.threshold for c, o in outcomes.items() if o.threshold is not None},
  )


def print_closing_summary(summary: dict, outcomes: dict[str, CategoryOutcome], workdir) -> None:
  print(reports.format_summary_table(summary))
  skipped = data.skipped_summary([s for o in outcomes.values() for s in o.splits])
  if skipped:
    print("\nSkipped files (see metrics.json):\n" + skipped)
  total = sum(o.timing["images"] for o in outcomes.values())
  seconds = sum(o.timing["seconds"] for o in outcomes.values())
  print(f"\nScored {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.2f} img/s).")
  print(f"Outputs in {workdir}")


def describe_model(model, mesh, categories) -> None:
  log.info(
    "Model: %dpx, patch %d, encoder %dx%d, decoder %dx%d; %d devices; categories: %s",
    model.img_size,
    model.patch_size,
    model.embed_dim,
    model.depth,
    model.decoder_embed_dim,
    model.decoder_depth,
    mesh.devices.size,
    ", ".join(categories),
  )


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs zero-shot scoring for every configured category; returns the summary dict."""
  validate(config)
  categories = data.resolve_categories(config.data)  # Early error for a bad path/category.
  model, params = common.load_model(config.model, config.seed)
  mesh, scorer = make_model_scorer(model, config)
  workdir = common.prepare_workdir(workdir, config)
  describe_model(model, mesh, categories)
  replicated = parallel.replicate(params, mesh)
  key = jax.random.key(config.seed)

  outcomes = {
    category: evaluate_category(
      model, params, replicated, category, config, scorer, mesh, key, workdir
    )
    for category in categories
  }
  summary = summarize_outcomes(outcomes, config.data.name)
  if jax.process_index() == 0:
    write_category_reports(workdir, outcomes)
    reports.write_metrics_json(workdir / "metrics.json", summary)
    reports.write_markdown_table(workdir / "metrics.md", summary, config.data.name, "zero_shot")
    print_closing_summary(summary, outcomes, workdir)
  return summary

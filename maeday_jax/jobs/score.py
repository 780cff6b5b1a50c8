"""The bulk scoring job: MAEDAY zero-shot scores of every image of a folder, glob or manifest.

    python -m maeday_jax.main --config configs/score.py --workdir runs/photos \
      --config.data.path=/photos --config.model.checkpoint=mae_vit_large

Outputs under the work directory (see `maeday_jax.bulk.engine` for the layout):
  scores.csv      file (as listed), score, label when a CSV manifest gives one, and
                  predicted_label with `threshold.method='fixed'`
  scores.parquet  the same rows, when `pyarrow` can be imported (otherwise not written)
  summary.json    images scored, skipped files with reasons, images/s per process, image
                  AUROC / AP / F1-max when labelled, the maps and pictures written
  maps_index.csv  with `outputs.maps`: file, map shard, row (`bulk.maps_store.load_map`)
  pictures/       with `outputs.top_pictures`: `<rank>_<name>.png` heatmap overlays
  shards/         each process's committed parts (and map shards) and progress record
  jax_cache/      the persistent compilation cache (`compilation_cache_dir`)
  config.json     the resolved configuration

Rerunning the same command on the same work directory resumes where the last run
stopped (after a kill, a pre-emption, a crash); a finished run does nothing again.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import ml_collections

from maeday_jax import evaluation
from maeday_jax.bulk import engine, maps_store, source
from maeday_jax.jobs import common

log = logging.getLogger("maeday_jax")

CACHE_FOLDER = "jax_cache"


def compilation_cache_dir(config: ml_collections.ConfigDict, workdir) -> str:
  """The persistent compilation cache folder ('' = none): `<workdir>/jax_cache` by default."""
  value = config.get("compilation_cache_dir")
  if value is None:
    return str(pathlib.Path(workdir).expanduser() / CACHE_FOLDER)
  return str(pathlib.Path(value).expanduser()) if value else ""


THRESHOLD_METHODS = ("fixed", "none")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the bulk job's own fields (threshold and outputs)."""
  common.require(
    config.commit_every >= 1, "commit_every", f"must be >= 1 batch, got {config.commit_every}."
  )
  method = config.threshold.method
  common.require(
    method in THRESHOLD_METHODS,
    "threshold.method",
    f"{method!r}: this job predicts labels only with a fixed threshold; use 'fixed' (with "
    "--config.threshold.value) or 'none'.",
  )
  outputs = config.outputs
  common.require(
    outputs.maps in maps_store.MAP_DTYPES,
    "outputs.maps",
    f"{outputs.maps!r} is not one of {', '.join(maps_store.MAP_DTYPES)}.",
  )
  common.require(
    outputs.top_pictures >= 0,
    "outputs.top_pictures",
    f"must be >= 0 (0 = none), got {outputs.top_pictures}.",
  )
  common.require(
    outputs.top_pictures == 0 or outputs.maps != "none",
    "outputs.top_pictures",
    f"{outputs.top_pictures} pictures need the maps: set --config.outputs.maps to float16 "
    "or uint8 (it is 'none').",
  )


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Scores every listed image once (resuming a previous run); returns the summary."""
  cache = compilation_cache_dir(config, workdir)
  if cache:
    # Before anything compiles: later runs and the other hosts reuse the compiled step.
    jax.config.update("jax_compilation_cache_dir", cache)
  common.validate_scoring(config)
  validate(config)
  listing = source.list_source(config.data.path)
  log.info(
    "%s: %d images (%s), %d per process on %d process(es).",
    config.data.path,
    len(listing),
    listing.kind,
    -(-len(listing) // jax.process_count()),
    jax.process_count(),
  )
  workdir = common.prepare_workdir(workdir, config)

  def make_scoring():
    model, params = common.load_model(config.model, config.seed)
    scoring = evaluation.Scoring.from_config(model, params, config)
    common.describe_model(model, scoring.mesh, [listing.kind])
    return scoring

  summary = engine.score_listing(
    listing,
    workdir,
    make_scoring=make_scoring,
    batch_size=config.batch_size,
    commit_every=config.commit_every,
    threshold=float(config.threshold.value) if config.threshold.method == "fixed" else None,
    maps=config.outputs.maps,
    top_pictures=config.outputs.top_pictures,
  )
  if jax.process_index() == 0:
    print(
      f"Scored {summary['images']} of {summary['listed']} images "
      f"({summary['skipped_count']} skipped, see summary.json): {summary['scores']}"
    )
  return summary

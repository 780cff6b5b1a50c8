"""The bulk scoring job: any detector's scores of every image of a folder, glob or manifest.

    python -m maeday_jax.main --config configs/score.py --workdir runs/photos \
      --config.data.path=/photos --config.model.checkpoint=mae_vit_large
    python -m maeday_jax.main --config configs/score.py --workdir runs/line3_today \
      --config.detector=runs/line3_pc/detector --config.data.path=/line3/today

Without `--config.detector` it scores zero-shot MAEDAY with this config's `model`,
`num_masks`, ... sections; with a fitted artifact folder, the artifact decides the model.

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
stopped (after a kill, a pre-emption, a crash); a finished run scores nothing again. A
rerun after a committed input changed (its path, size, modification time or CSV label)
is refused with the changed files named: `--overwrite` or a new --workdir starts fresh.
One run at a time: a second run on a work directory in use stops at once, naming the
host and pid that hold it (`bulk.lock`). A model that gives NaN or infinite maps or
scores stops the run before that batch is committed; a run that scores no image at all
is an error.

A transductive detector (`Detector.transductive`: an image's score depends on the other
images scored with it, e.g. MuSc) needs `--config.group_size`: it scores groups of that
many consecutive images of the sorted listing (rounded up to a multiple of the device
count; on several processes, each process's consecutive share of its shard), one global
batch per group, each group committed on its own (`batch_size` and `commit_every` do not
apply). A rerun forms the same groups; a rerun with another group size is refused. Other
detectors ignore `group_size` (a log line says so).
"""

from __future__ import annotations

import logging
import math
import pathlib
import time

import jax
import ml_collections

from maeday_jax import evaluation
from maeday_jax.bulk import engine, maps_store, source
from maeday_jax.detectors import artifact, registry
from maeday_jax.jobs import common, detector_choice

log = logging.getLogger("maeday_jax")

CACHE_FOLDER = "jax_cache"


def compilation_cache_dir(config: ml_collections.ConfigDict, workdir) -> str:
  """The persistent compilation cache folder ('' = none): `<workdir>/jax_cache` by default."""
  value = config.get("compilation_cache_dir")
  if value is None:
    return str(pathlib.Path(workdir).expanduser() / CACHE_FOLDER)
  return str(pathlib.Path(value).expanduser()) if value else ""


THRESHOLD_METHODS = ("fixed", "none")


def is_transductive(spec: str, config: ml_collections.ConfigDict) -> bool:
  """Whether the detector `spec` (a checked method name or artifact folder,
  `detector_choice.check`) scores groups; read without loading any model."""
  if detector_choice.is_path(spec):
    manifest = artifact.read_manifest(spec)
    settings = ml_collections.ConfigDict(manifest["settings"])
    return registry.get(manifest["method"]).scores_groups(settings)
  return registry.get(spec).scores_groups(config)


def batching(config: ml_collections.ConfigDict, transductive: bool) -> tuple[int, int, int]:
  """(global batch, commit_every, group_size) the job scores with.

  A transductive detector's group is the global batch (`engine.group_batch_size`),
  committed after each; other detectors use `batch_size` and `commit_every` (group 0).

  Raises:
    ConfigError: a transductive detector without `group_size`.
  """
  group_size = int(config.get("group_size", 0))
  common.require(group_size >= 0, "group_size", f"must be >= 0 (0 = not set), got {group_size}.")
  if not transductive:
    if group_size:
      log.info(
        "--config.group_size=%d is ignored: this detector scores every image on its own "
        "(it is not transductive); batches of --config.batch_size=%d are scored.",
        group_size,
        config.batch_size,
      )
    return config.batch_size, config.commit_every, 0
  common.require(
    group_size > 0,
    "group_size",
    "this detector is transductive (an image's score depends on the images scored with "
    "it): set the number of images scored together, e.g. --config.group_size=64.",
  )
  devices = jax.device_count()
  batch_size = engine.group_batch_size(group_size, devices)
  rounded = "" if batch_size == group_size else f" rounded up to a multiple of {devices} devices"
  log.info(
    "Transductive detector: groups of %d consecutive images (--config.group_size=%d%s), "
    "one commit per group; --config.batch_size and --config.commit_every do not apply.",
    batch_size,
    group_size,
    rounded,
  )
  return batch_size, 1, group_size


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
  # Whatever the method: config.json and summary.json must stay valid JSON (no NaN).
  value = config.threshold.value
  common.require(
    value is None or math.isfinite(float(value)),
    "threshold.value",
    f"must be a finite number, got {value}.",
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
  started = time.perf_counter()  # The start-up time to the first scores counts from here.
  cache = compilation_cache_dir(config, workdir)
  if cache:
    # Before anything compiles: later runs and the other hosts reuse the compiled step.
    jax.config.update("jax_compilation_cache_dir", cache)
  spec = detector_choice.check(config)  # Before anything else: a typo fails at once.
  common.validate_scoring(config)
  validate(config)
  batch_size, commit_every, group_size = batching(config, is_transductive(spec, config))
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
    detector = detector_choice.load(config, spec, "score")
    return evaluation.Scoring.for_detector(
      detector,
      batch_size=batch_size,
      num_workers=config.data.num_workers,
      prefetch=config.data.prefetch,
    )

  summary = engine.score_listing(
    listing,
    workdir,
    make_scoring=make_scoring,
    detector=f"fitted detector {spec}" if detector_choice.is_path(spec) else "",
    batch_size=batch_size,
    commit_every=commit_every,
    threshold=float(config.threshold.value) if config.threshold.method == "fixed" else None,
    maps=config.outputs.maps,
    top_pictures=config.outputs.top_pictures,
    group_size=group_size,
    started=started,
  )
  if jax.process_index() == 0:
    print(
      f"Scored {summary['images']} of {summary['listed']} images "
      f"({summary['skipped_count']} skipped, see summary.json): {summary['scores']}"
    )
  return summary


def interrupted_message(workdir) -> str:
  """What `main` prints on Ctrl-C: what this job keeps, and how to go on."""
  shards = pathlib.Path(workdir) / engine.SHARDS_FOLDER
  return (
    f"Interrupted. Every batch committed so far is kept in {shards} (each process's "
    "part_<n>.csv and progress.json); run the same command again to resume from the last "
    "commit. scores.csv and summary.json are written once every image is scored."
  )

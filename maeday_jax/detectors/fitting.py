"""Fitting a detector on a dataset's normal training images: the one rule for every method.

    detector = fitting.create(config)                    # by name, settings checked
    normals = fitting.normal_images(config, category)    # shots + held-out normals
    fitting.fit_with_statistics(detector, normals, jax.random.key(config.seed))

Shots: `config.shots = k > 0` takes k normal training images chosen by `config.seed`
(`data.select_shots`); `config.shots = 0` takes every normal training image. In both
cases up to `config.heldout_normals` other normal images (also chosen by the seed) are
kept aside: the detector's normal statistics (mean and spread of its maps and scores,
which ensembles standardise by) are measured on them, never on the shots. Zero-shot
methods use no shots, only the held-out normals.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import ml_collections
import numpy as np

from maeday_jax import tiling as tiles
from maeday_jax import tiling_native
from maeday_jax.config_errors import require
from maeday_jax.detectors import registry, scoring
from maeday_jax.detectors.base import Detector, NormalImages

log = logging.getLogger("maeday_jax")

HELDOUT_SEED_OFFSET = 1_000_003  # The held-out normals' ranking differs from the shots'.


def create(config: ml_collections.ConfigDict, name: str | None = None) -> Detector:
  """A new detector of `name` (default `config.detector`), its settings validated."""
  name = registry.check_name(name or config.detector)
  cls = registry.get(name)
  cls.validate(config)
  return registry.create(name, config)


def choose_images(split, shots: int, heldout: int, seed: int) -> tuple[list[int], list[int]]:
  """(shot indices, held-out indices) of a training split of normal images.

  Ranked by `data.select_shots` (file names and the seed; the held-out ranking from
  another seed): `shots` > 0 takes the first `shots`, 0 every image not held out; up to
  `heldout` images that are not shots are held out.
  """
  from maeday_jax import data

  ranked = data.select_shots(split, len(split), seed)
  ranked_heldout = data.select_shots(split, len(split), seed + HELDOUT_SEED_OFFSET)
  if shots > 0:
    chosen = ranked[:shots]
    taken = set(chosen)
    return chosen, [i for i in ranked_heldout if i not in taken][: max(0, heldout)]
  held = ranked_heldout[: max(0, min(heldout, len(split) - 1))]
  taken = set(held)
  return [i for i in ranked if i not in taken], held


def normal_images(
  config: ml_collections.ConfigDict,
  category: str,
  workdir=None,
  *,
  with_shots: bool = True,
  seed: int | None = None,
) -> tuple[NormalImages, dict]:
  """The normal images of `category`'s training split for a fit, and a record of them
  (`seed`: the shot selection, default `config.seed`).

  Returns (normals, record): `record` lists the shot and held-out file names.

  Raises:
    ConfigError: fewer normal training images than `config.shots`.
  """
  from maeday_jax import data

  split = data.load_split(config.data, category, "train")
  shots = int(config.shots)
  require(
    shots <= len(split),
    "shots",
    f"{shots} shots, but {config.data.name}/{category} has only {len(split)} normal "
    "training images; use at most that many (0 = all of them).",
  )
  seed = int(config.seed if seed is None else seed)
  shot_indices, heldout = choose_images(split, shots, int(config.get("heldout_normals", 0)), seed)
  if not with_shots:
    shot_indices = []

  def load(indices, size):
    if not indices:
      return np.zeros((0, size, size, 3), np.float32)
    return np.stack([data.load_example(split, int(i), size)["image"] for i in indices])

  def load_native(indices, aspect):
    return [data.preprocess_image(split[int(i)]["image"], aspect) for i in indices]

  normals = NormalImages(
    read=lambda size: (load(shot_indices, size), load(heldout, size)),
    read_native=lambda side: (load_native(shot_indices, side), load_native(heldout, side)),
    data=config.data,
    extra_data=list(config.get("extra_data", [])),
    workdir=workdir,
    category=category,
  )
  record = {
    "category": category,
    "seed": seed,
    "shots": [split.file_name(i) for i in shot_indices],
    "heldout": [split.file_name(i) for i in heldout],
  }
  return normals, record


def fit_with_statistics(
  detector: Detector, normals: NormalImages, key, subdir: str | None = None
) -> Detector:
  """`detector.fit(normals, key)`, then its normal statistics on the held-out normals.

  `subdir`: train in this sub-folder of `normals.workdir` (ensemble members).
  """
  if subdir is not None and normals.workdir is not None:
    normals = dataclasses.replace(normals, workdir=pathlib.Path(normals.workdir) / subdir)
  # A tiled detector learns from its normal images' tiles (those that train on whole data
  # sources crop their own: `load_size`, `augment.crop`); its statistics are those of
  # whole (tiled) images, as it scores them.
  grid = detector.tiling
  native = grid is not None and grid.native  # Images read with their aspect ratio kept.
  if grid is None or detector.trains_on_sources:
    to_fit = normals
  elif native:
    to_fit = tiling_native.tile_normals(normals, grid)
  else:
    to_fit = tiles.tile_normals(normals, grid)
  detector.fit(to_fit, key)
  if native:
    _, heldout = normals.native_images(grid.aspect)
  else:
    _, heldout = normals.images(detector.read_size)
  detector.normal_statistics = scoring.normal_statistics(detector, heldout)
  return detector

"""Which images a job reads (`maeday_jax.data`): the `data` section and pre-training data
sources. Light: imports nothing but `ml_collections` (see `maeday_jax.settings`).
"""

from __future__ import annotations

import os

import ml_collections

DEFAULT_DATA_DIR = "~/.cache/maeday_jax/tfds"


def data_config() -> ml_collections.ConfigDict:
  """Which images a job reads (`config.data` of every job).

  Fields:
    name: `mvtec_ad`, `visa`, `magnetic_tile` or `folder`.
    path: the raw copy: an extracted archive, the downloaded archive or the user's folder
      of images to score. It is the tfds manual directory. Empty for `mvtec_ad` / `visa`
      means download the public archive into `data_dir`.
    categories: 'all', a comma-separated string or a list of category names. `folder`
      and `magnetic_tile` have one pseudo-category (see `data.resolve_categories`).
    data_dir: where the prepared array_record files are cached (default
      `$MAEDAY_DATA_DIR` or ~/.cache/maeday_jax/tfds). They are rebuilt when the builder
      version changes and, for `folder` and `magnetic_tile`, when the files change.
    normal_path: `folder` only: optional folder of normal reference images ('train').
    mask_path: `folder` only: optional folder of masks paired with the images by name.
    num_workers: threads that decode and resize images while the model computes.
    prefetch: batches prepared ahead of the one being consumed.
    max_image_pixels: the most pixels (width x height) one image or mask may have; a
      larger one is skipped, named, before it is decoded (a decompression bomb: a small
      PNG can declare gigabytes of pixels). 0 = `$MAEDAY_MAX_IMAGE_PIXELS` if set, else
      derived from memory: min(250 megapixels, half the physical (or container) memory
      / (num_workers x 20 bytes)); see `maeday_jax.data.images`.

  Example overrides on the command line:

    --config.data.name=mvtec_ad --config.data.categories=bottle,carpet
    --config.data.name=mvtec_ad --config.data.path=/data/mvtec_anomaly_detection.tar.xz
    --config.data.name=folder --config.data.path=/photos/line3 \\
        --config.data.normal_path=/photos/line3_good --config.data.mask_path=/photos/masks
  """
  config = ml_collections.ConfigDict()
  config.name = "mvtec_ad"
  config.path = ""
  # A string or a list: the field is typed `object` so both can be assigned.
  config.categories = ml_collections.FieldReference("all", field_type=object)
  config.data_dir = os.environ.get("MAEDAY_DATA_DIR", DEFAULT_DATA_DIR)
  config.normal_path = ""
  config.mask_path = ""
  config.num_workers = 4
  config.prefetch = 2
  config.max_image_pixels = 0
  return config


def training_source(splits: str = "train", **fields) -> ml_collections.ConfigDict:
  """A pre-training data source: the data settings plus `splits` (comma-separated)."""
  source = data_config()
  source.splits = splits
  for name, value in fields.items():
    setattr(source, name, value)
  return source


def as_training_source(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `data` as a pre-training source: a job's `config.data` (its `train`
  split) or a source that already names its `splits`."""
  fields = data.to_dict()
  return training_source(fields.pop("splits", "train"), **fields)

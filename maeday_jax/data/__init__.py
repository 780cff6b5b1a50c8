"""The data layer: tfds builders (no TensorFlow), prepared splits, batches, few-shot choice.

Typical use:

  categories = data.resolve_categories(config.data)
  test = data.load_split(config.data, categories[0], "test")
  for batch in data.batches(test, batch_size=8, image_size=224):
    ...  # batch["image"], batch["valid"], ...
  train = data.load_split(config.data, categories[0], "train")
  shots = data.select_shots(train, k=1, seed=0)
"""

from maeday_jax.data.errors import DataError, DownloadError, ImageTooLarge
from maeday_jax.data.images import decode_image, decode_mask, read_image, read_mask
from maeday_jax.data.pipeline import batches, batches_per_shard, load_example, shard_bounds
from maeday_jax.data.prepare import DATASETS, data_dir, prepare, resolve_categories
from maeday_jax.data.preprocess import preprocess_image
from maeday_jax.data.shots import select_shots
from maeday_jax.data.split import Split, load_split, skipped_summary
from maeday_jax.imagenet import denormalize, normalize
from maeday_jax.settings.data import data_config as get_data_config

__all__ = [
  "DATASETS",
  "DataError",
  "DownloadError",
  "ImageTooLarge",
  "Split",
  "batches",
  "batches_per_shard",
  "data_dir",
  "decode_image",
  "decode_mask",
  "denormalize",
  "get_data_config",
  "load_example",
  "load_split",
  "normalize",
  "prepare",
  "preprocess_image",
  "read_image",
  "read_mask",
  "resolve_categories",
  "select_shots",
  "shard_bounds",
  "skipped_summary",
]

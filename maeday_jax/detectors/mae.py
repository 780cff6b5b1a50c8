"""MAEDAY on an MAE pre-trained on the normal images themselves (`maeday_jax.pretrain`).

`fit` trains (or continues, from `model.checkpoint`) an MAE on the normal training
images of every category of `config.data` and `config.extra_data`, with the pre-training
recipe of `config.pretrain` (resumable in the fit's work directory), then scores like
zero-shot MAEDAY with the trained weights, which the artifact stores.
"""

from __future__ import annotations

import pathlib
import tempfile

import ml_collections

from maeday_jax.detectors.maeday import ZeroShotMaeday
from maeday_jax.settings import data as data_settings
from maeday_jax.settings import pretrain as pretrain_settings


def pretrain_section() -> ml_collections.ConfigDict:
  """The pre-training settings of the `mae` detector (`settings.pretrain.loop_config`'s
  `train`, checkpointing and logging)."""
  base = pretrain_settings.loop_config()
  section = ml_collections.ConfigDict()
  section.train = base.train
  section.checkpoint_every = base.checkpoint_every
  section.keep_checkpoints = base.keep_checkpoints
  section.log_every = base.log_every
  return section


def training_config(settings, data, extra_data, base=None) -> ml_collections.ConfigDict:
  """What every training run on data sources reads (seed, model, the normal images of
  `data` and `extra_data`), set on `base` (default a new ConfigDict)."""
  config = ml_collections.ConfigDict() if base is None else base
  config.seed = settings.seed
  config.model = settings.model
  config.data = data_settings.as_training_source(data)
  config.extra_data = list(extra_data)
  return config


def pretraining_config(settings, data, extra_data, section) -> ml_collections.ConfigDict:
  """A pre-training config (`pretrain.loop.train`): the detector's seed, model and data,
  and `section`'s `train`, `checkpoint_every`, `keep_checkpoints` and `log_every`."""
  config = training_config(settings, data, extra_data, pretrain_settings.loop_config())
  for field in ("train", "checkpoint_every", "keep_checkpoints", "log_every"):
    config[field] = section[field]
  config.eval.enabled = False
  return config


class PretrainedMaeday(ZeroShotMaeday):
  """MAEDAY with an MAE trained on the normal images (multi-class: every category)."""

  method = "mae"
  summary = "MAEDAY on an MAE pre-trained on the normal images"
  trains_on_sources = True
  SECTIONS = {
    **ZeroShotMaeday.SECTIONS,
    "pretrain": pretrain_section,
    "extra_data": lambda: [],
  }

  @classmethod
  def validate(cls, config) -> None:
    from maeday_jax import recipe_checks
    from maeday_jax.config_errors import require

    super().validate(config)
    recipe_checks.validate_pretrain_train(config.pretrain.train, "pretrain.train")
    for field in ("checkpoint_every", "keep_checkpoints", "log_every"):
      value = config.pretrain[field]
      require(value >= 1, f"pretrain.{field}", f"must be >= 1, got {value}.")

  def fit(self, normals, key) -> None:
    del key  # The pre-training seed is `settings.seed`.
    from maeday_jax import checkpoints, model_builder
    from maeday_jax.pretrain import loop

    if normals.data is None:
      raise ValueError("the mae detector trains on data sources: fit it through a job config.")
    extra = list(self.settings.get("extra_data", [])) or normals.extra_data
    config = pretraining_config(self.settings, normals.data, extra, self.settings.pretrain)
    with tempfile.TemporaryDirectory() as scratch:
      workdir = pathlib.Path(normals.workdir or scratch) / "pretrain"
      loop.train(config, workdir)
      model_config = self.settings.model
      self._model, params = checkpoints.load_mae(
        workdir / loop.MODEL_DIR,
        dtype=model_builder.compute_dtype(model_config.dtype),
        attention=model_config.get("attention", "auto"),
      )
    self.state = {"mae": params}
    self._weights = None  # Trained here: stored in the artifact.

  def restore(self, record: dict, state) -> None:
    super().restore({**record, "weights": None}, state)

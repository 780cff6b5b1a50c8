"""MALA: an MAE trained on normal images (stage 1), then a segmenter trained on synthetic
defects (stage 2); its defect probability is the map (`maeday_jax.mala`).

`fit` trains both stages on the normal training images of every category of
`config.data` and `config.extra_data` (multi-class, resumable in the fit's work
directory), as `configs/mala.py` does; the artifact stores the segmenter's weights.
"""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import ml_collections

from maeday_jax.config_errors import ConfigError, require
from maeday_jax.detectors.base import Detector
from maeday_jax.detectors.mae import pretraining_config, training_config
from maeday_jax.settings import mala as mala_settings
from maeday_jax.settings import model as model_settings

_STAGE_FIELDS = ("stage1", "stage2", "pool_size", "checkpoint_every", "keep_checkpoints")


def mala_section() -> ml_collections.ConfigDict:
  """MALA's training and scoring settings (`settings.mala.stages_config`: stage1, stage2,
  pool_size, checkpointing, logging)."""
  base = mala_settings.stages_config()
  section = ml_collections.ConfigDict()
  for field in (*_STAGE_FIELDS, "log_every"):
    section[field] = base[field]
  return section


def stage1_enabled(stage1) -> bool:
  """Whether stage 1 trains at all (epochs or steps > 0)."""
  return bool(stage1.get("steps")) or float(stage1.epochs) > 0


def stage1_config(settings, data, extra_data) -> ml_collections.ConfigDict:
  """The MAE pre-training config of stage 1 (`pretrain.loop.train`)."""
  mala = settings.mala
  section = ml_collections.ConfigDict({"train": mala.stage1})
  for field in ("checkpoint_every", "keep_checkpoints", "log_every"):
    section[field] = mala[field]
  return pretraining_config(settings, data, extra_data, section)


def stage2_config(settings, data, extra_data) -> ml_collections.ConfigDict:
  """The segmenter's training config of stage 2 (`mala.stage2.train`)."""
  config = training_config(settings, data, extra_data)
  config.checkpoint_every = settings.mala.checkpoint_every
  config.log_every = settings.mala.log_every
  config.train = settings.mala.stage2
  return config


def validate_textures(synthetic, field: str) -> None:
  """Checks the synthetic-defect texture sources (and their folder) before training.

  Raises:
    ConfigError: naming `field`.
  """
  import os

  from maeday_jax.mala import stage2, texture_folder

  names = synthetic.textures
  sources = [
    n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()
  ]
  require(
    bool(sources) and all(s in stage2.TEXTURE_SOURCES for s in sources),
    f"{field}.textures",
    f"{names!r}: give a comma-separated subset of {', '.join(stage2.TEXTURE_SOURCES)}.",
  )
  if "folder" in sources:
    folder = synthetic.texture_dir
    require(
      bool(folder),
      f"{field}.texture_dir",
      "is empty but textures include 'folder'; give a folder of texture images (e.g. DTD).",
    )
    require(
      os.path.isdir(os.path.expanduser(folder)),
      f"{field}.texture_dir",
      f"{folder}: no such folder of texture images.",
    )
    max_textures = synthetic.get("max_textures") or 0
    require(
      max_textures >= 0,
      f"{field}.max_textures",
      f"must be >= 0 (0 = every texture), got {max_textures}.",
    )
    # Stage 2 reads the folder only after stage 1 has trained: a folder without one
    # readable image must fail now, not minutes later.
    try:
      texture_folder.check_texture_folder(folder)
    except ValueError as e:
      raise ConfigError(f"--config.{field}.texture_dir: {e}") from e


def validate_sections(model, mala, prefix: str) -> None:
  """Checks MALA's settings (`model` and a `mala_section`-shaped `mala`, whose fields
  are named `<prefix><field>` in messages) before any training.

  Raises:
    ConfigError: naming the field and what to do.
  """
  from maeday_jax import model_builder

  model_builder.validate_model_config(model)
  require(
    stage1_enabled(mala.stage1) or model.checkpoint != model_settings.RANDOM_WEIGHTS,
    f"{prefix}stage1.epochs",
    "stage 1 is off (epochs and steps 0) but model.checkpoint is 'random': stage 2 needs "
    "a trained MAE; enable stage 1 or give a checkpoint.",
  )
  if stage1_enabled(mala.stage1):
    from maeday_jax import recipe_checks

    recipe_checks.validate_pretrain_train(mala.stage1, f"{prefix}stage1")
  validate_textures(mala.stage2.synthetic, f"{prefix}stage2.synthetic")
  require(mala.pool_size >= 1, f"{prefix}pool_size", f"must be >= 1, got {mala.pool_size}.")
  validate_stage2(mala.stage2, f"{prefix}stage2")
  for field in ("checkpoint_every", "keep_checkpoints", "log_every"):
    value = mala.get(field, 1)
    require(value >= 1, f"{prefix}{field}", f"must be >= 1, got {value}.")


def validate_stage2(stage2, field: str) -> None:
  """Checks the segmenter's training settings (`settings.mala.stage2_config`) that its
  training would otherwise reject only after stage 1.

  Raises:
    ConfigError: naming the field.
  """
  import math

  from maeday_jax.parallel import require_divides_devices

  def number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

  require(stage2.batch_size >= 1, f"{field}.batch_size", f"must be >= 1, got {stage2.batch_size}.")
  require_divides_devices(stage2.batch_size, f"{field}.batch_size")
  steps = stage2.get("steps") or 0
  require(
    steps > 0 or (number(stage2.epochs) and stage2.epochs > 0),
    f"{field}.epochs",
    f"is {stage2.epochs} and {field}.steps is {steps}: set either to a positive value.",
  )
  require(number(stage2.lr) and stage2.lr > 0, f"{field}.lr", f"must be > 0, got {stage2.lr}.")
  load_size = stage2.get("load_size", 0)
  require(
    isinstance(load_size, int) and load_size >= 0,
    f"{field}.load_size",
    f"must be >= 0 (0 = the model's input size), got {load_size!r}.",
  )
  from maeday_jax.recipe_checks import check_load_short_side

  check_load_short_side(stage2.get("load_short_side", 0), f"{field}.load_short_side")
  for name in ("min_lr", "weight_decay", "grad_clip", "l1_weight", "focal_weight", "focal_gamma"):
    value = stage2.get(name, 0.0)
    require(number(value) and value >= 0, f"{field}.{name}", f"must be >= 0, got {value}.")
  require(
    stage2.l1_weight + stage2.focal_weight > 0,
    f"{field}.l1_weight",
    "and focal_weight are both 0: the segmenter would learn nothing.",
  )
  syn = stage2.synthetic
  require(
    number(syn.anomaly_prob) and 0.0 <= syn.anomaly_prob <= 1.0,
    f"{field}.synthetic.anomaly_prob",
    f"must be in [0, 1], got {syn.anomaly_prob}.",
  )
  beta = tuple(syn.beta_range)
  require(
    len(beta) == 2 and all(number(b) for b in beta) and 0.0 <= beta[0] <= beta[1] <= 1.0,
    f"{field}.synthetic.beta_range",
    f"must be two numbers 0 <= lo <= hi <= 1, got {beta}.",
  )
  require(
    number(syn.threshold),
    f"{field}.synthetic.threshold",
    f"must be a finite number (the Perlin noise threshold), got {syn.threshold}.",
  )


class Mala(Detector):
  """The MALA segmenter; image score = the maximum of the `pool_size` average-pooled map."""

  method = "mala"
  summary = "MALA: MAE + segmenter trained on synthetic defects (normal images only)"
  trains_on_sources = True
  SECTIONS = {"model": model_settings.model_config, "mala": mala_section, "extra_data": lambda: []}

  def __init__(self, settings):
    super().__init__(settings)
    self._segmenter = None
    self.training: dict = {}  # The stages' training summaries of the last `fit`.

  @classmethod
  def validate(cls, config) -> None:
    validate_sections(config.model, config.mala, "mala.")

  @property
  def input_size(self) -> int:
    return int(self._segmenter.mae.img_size)

  @property
  def reconstructor(self):
    return None  # The segmenter predicts defects, not reconstructions.

  def fit(self, normals, key) -> None:
    del key  # Both stages draw from `settings.seed`.
    from maeday_jax.mala import stage2
    from maeday_jax.pretrain import loop

    if normals.data is None:
      raise ValueError("the mala detector trains on data sources: fit it through a job config.")
    extra = list(self.settings.get("extra_data", [])) or normals.extra_data
    with tempfile.TemporaryDirectory() as scratch:
      workdir = pathlib.Path(normals.workdir or scratch)
      mae_checkpoint = str(self.settings.model.checkpoint)
      self.training = {}
      if stage1_enabled(self.settings.mala.stage1):
        stage1 = stage1_config(self.settings, normals.data, extra)
        self.training["stage1"] = loop.train(stage1, workdir / "stage1")
        mae_checkpoint = str(workdir / "stage1" / loop.MODEL_DIR)
      from maeday_jax import tiling

      stage2_settings = self.settings.mala.stage2
      tiling.warn_if_training_reads_differ(
        self.tiling, stage2_settings.get("load_short_side", 0), "mala.stage2.load_short_side"
      )
      self.training["stage2"] = stage2.train(
        stage2_config(self.settings, normals.data, extra), workdir / "stage2", mae_checkpoint
      )
      self.training["mae_checkpoint"] = mae_checkpoint
      model = self.settings.model
      self._segmenter, params = stage2.load_segmenter(
        workdir / "stage2" / stage2.SEGMENTER_DIR, model.dtype, model.get("attention", "auto")
      )
    self.state = {"segmenter": params}

  def step_signature(self):
    return ("mala", self._segmenter, int(self.settings.mala.pool_size))

  def score_function(self, mesh, local_batch: int):
    from maeday_jax.mala import segmenter as segmenter_lib

    segmenter, pool_size = self._segmenter, int(self.settings.mala.pool_size)

    def score(state, images, ids, key):
      del ids, key  # Deterministic.
      maps = segmenter_lib.defect_probability(
        segmenter.apply({"params": state["segmenter"]}, images)
      )
      return maps, segmenter_lib.pooled_max(maps, pool_size)

    return score

  def record(self) -> dict:
    from maeday_jax import models

    return {"architecture": models.architecture(self._segmenter.mae)}

  def restore(self, record: dict, state: Any) -> None:
    from maeday_jax import model_builder, models
    from maeday_jax.models.segmenter import Segmenter

    model = self.settings.model
    mae = models.MaskedAutoencoder(
      **record["architecture"],
      dtype=model_builder.compute_dtype(model.dtype),
      attention=model.get("attention", "auto"),
    )
    self._segmenter = Segmenter(mae)
    self.state = state

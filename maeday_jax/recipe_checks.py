"""Checks of the training recipes' settings, before any image is read or anything compiles.

The few-shot adaptation recipe (`settings.few_shot`), the MAE pre-training recipe
(`settings.pretrain`: the pre-training job's `train`, MALA's `stage1`, the `mae`
detector's `pretrain.train`) and the training data sources: each value is checked where
the training code would otherwise fail only after the data is read or the model compiled.
The detectors call them from their `validate`, the jobs from theirs.
"""

import math

import ml_collections

from maeday_jax.config_errors import ConfigError, require
from maeday_jax.parallel import require_divides_devices
from maeday_jax.settings.tiling import MAX_SHORT_SIDE

SPLITS = ("train", "test")  # What every dataset prepares (`data.load_split`).


def validate_few_shot_train(train: ml_collections.ConfigDict, field: str = "train") -> None:
  """Checks the few-shot adaptation recipe (`settings.few_shot.few_shot_train_config`)
  before any image is read or anything compiles; `field` names it in messages.

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  import re

  from maeday_jax.settings import few_shot as few_shot_settings

  require(
    train.finetune in few_shot_settings.FINETUNE_MODES,
    f"{field}.finetune",
    f"{train.finetune!r} is not one of {few_shot_settings.FINETUNE_MODES}.",
  )
  require(train.steps >= 0, f"{field}.steps", "must be >= 0.")
  require(train.batch_size >= 1, f"{field}.batch_size", "must be >= 1.")
  require_divides_devices(train.batch_size, f"{field}.batch_size")
  require(
    train.lora.compute in few_shot_settings.LORA_COMPUTE_MODES,
    f"{field}.lora.compute",
    f"{train.lora.compute!r} is not one of {few_shot_settings.LORA_COMPUTE_MODES}.",
  )
  require(train.lora.rank >= 1, f"{field}.lora.rank", "must be >= 1.")

  from maeday_jax import augment

  rate = train.learning_rate
  require(
    rate is None or (is_finite_number(rate) and rate > 0),
    f"{field}.learning_rate",
    f"must be a positive number (or unset: the fine-tuning mode's default), got {rate}.",
  )
  require(
    is_finite_number(train.momentum) and 0.0 <= train.momentum < 1.0,
    f"{field}.momentum",
    f"must be in [0, 1), got {train.momentum}.",
  )
  require(
    is_finite_number(train.weight_decay) and train.weight_decay >= 0,
    f"{field}.weight_decay",
    f"must be a number >= 0, got {train.weight_decay}.",
  )
  require(
    is_finite_number(train.mask_ratio) and 0.0 <= train.mask_ratio < 1.0,
    f"{field}.mask_ratio",
    f"must be in [0, 1), got {train.mask_ratio}.",
  )
  require(
    train.checkpoint_every >= 0,
    f"{field}.checkpoint_every",
    f"must be >= 0 (0 = only the last step), got {train.checkpoint_every}.",
  )
  require(
    train.max_checkpoints >= 1,
    f"{field}.max_checkpoints",
    f"must be >= 1, got {train.max_checkpoints}.",
  )
  aug = train.augment
  require(
    is_finite_number(aug.max_rotation_deg) and aug.max_rotation_deg >= 0,
    f"{field}.augment.max_rotation_deg",
    f"must be a number >= 0, got {aug.max_rotation_deg}.",
  )
  lo, hi = aug.min_crop_scale, aug.max_crop_scale
  require(
    is_finite_number(lo) and is_finite_number(hi) and 0 < lo <= hi <= 1,
    f"{field}.augment.min_crop_scale",
    f"and max_crop_scale must satisfy 0 < min <= max <= 1, got {lo}, {hi}.",
  )
  require(
    aug.fill_mode in augment.FILL_MODES,
    f"{field}.augment.fill_mode",
    f"{aug.fill_mode!r} is not one of {', '.join(augment.FILL_MODES)}.",
  )
  lora = train.lora
  require(
    lora.alpha is None or (is_finite_number(lora.alpha) and lora.alpha > 0),
    f"{field}.lora.alpha",
    f"must be a positive number (or unset: the rank), got {lora.alpha}.",
  )
  targets = [lora.targets] if isinstance(lora.targets, str) else list(lora.targets)
  require(bool(targets), f"{field}.lora.targets", "is empty: LoRA would adapt nothing.")
  for pattern in targets:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(
        f"--config.{field}.lora.targets: {pattern!r} is not a regular expression ({e})."
      ) from e


def _number(field: str, value, low: float, high: float = math.inf, *, open_low=False) -> None:
  """Requires a finite `value` in [low, high] ((low, high] with `open_low`)."""
  above = value > low if open_low else value >= low
  require(
    is_finite_number(value) and above and value <= high,
    field,
    f"must be a number {'>' if open_low else '>='} {low:g}"
    + (f" and <= {high:g}" if math.isfinite(high) else "")
    + f", got {value!r}.",
  )


def _range(field: str, pair, low: float, high: float = math.inf) -> None:
  """Requires an increasing pair (lo, hi) with low < lo <= hi <= high."""
  ok = (
    isinstance(pair, (list, tuple))
    and len(pair) == 2
    and all(is_finite_number(v) for v in pair)
    and low < pair[0] <= pair[1] <= high
  )
  bound = f" <= {high:g}" if math.isfinite(high) else ""
  require(ok, field, f"must be two numbers lo, hi with {low:g} < lo <= hi{bound}, got {pair!r}.")


def validate_pretrain_train(train: ml_collections.ConfigDict, field: str = "train") -> None:
  """Checks an MAE pre-training recipe (`settings.pretrain.train_config`: this job's
  `train`, MALA's `stage1`, the `mae` detector's `pretrain.train`) before any data is read
  or anything compiles; `field` names it in messages.

  Raises:
    ConfigError: naming the field and what to set instead.
  """
  from maeday_jax.pretrain import step as step_lib

  require(train.batch_size >= 1, f"{field}.batch_size", f"must be >= 1, got {train.batch_size}.")
  require_divides_devices(train.batch_size, f"{field}.batch_size")
  steps = train.get("steps") or 0
  require(steps >= 0, f"{field}.steps", f"must be >= 0 (0 = from epochs), got {steps}.")
  _number(f"{field}.epochs", train.epochs, 0.0)
  require(
    steps > 0 or train.epochs > 0,
    f"{field}.epochs",
    f"is 0 and so is {field}.steps: set either to a positive value.",
  )
  _number(f"{field}.lr", train.lr, 0.0)
  _number(f"{field}.base_lr", train.base_lr, 0.0)
  require(
    train.lr > 0 or train.base_lr > 0,
    f"{field}.lr",
    f"and {field}.base_lr are both 0: nothing would train; set one to a positive value.",
  )
  _number(f"{field}.min_lr", train.min_lr, 0.0)
  _number(f"{field}.warmup_epochs", train.warmup_epochs, 0.0)
  if train.get("warmup_steps") is not None:
    require(
      train.warmup_steps >= 0,
      f"{field}.warmup_steps",
      f"must be >= 0 (or unset: from warmup_epochs), got {train.warmup_steps}.",
    )
  _number(f"{field}.weight_decay", train.weight_decay, 0.0)
  for beta in ("b1", "b2"):
    _number(f"{field}.{beta}", train[beta], 0.0, 1.0)
    require(train[beta] < 1.0, f"{field}.{beta}", f"must be < 1, got {train[beta]}.")
  _number(f"{field}.grad_clip", train.get("grad_clip") or 0.0, 0.0)
  _number(f"{field}.mask_ratio", train.mask_ratio, 0.0, 1.0)
  require(
    train.mask_ratio < 1.0, f"{field}.mask_ratio", f"must be in [0, 1), got {train.mask_ratio}."
  )
  require(
    train.loss in step_lib.LOSSES,
    f"{field}.loss",
    f"{train.loss!r} is not one of {', '.join(step_lib.LOSSES)}.",
  )
  require(
    train.get("pixel_loss", "mse") in step_lib.PIXEL_LOSSES,
    f"{field}.pixel_loss",
    f"{train.get('pixel_loss')!r} is not one of {', '.join(step_lib.PIXEL_LOSSES)}.",
  )
  weights = {
    name: train.get(name, default)
    for name, default in (("pixel_weight", 1.0), ("ssim_weight", 0.0), ("adversarial_weight", 0.0))
  }
  for name, value in weights.items():
    _number(f"{field}.{name}", value, 0.0)
  require(
    sum(weights.values()) > 0,
    f"{field}.pixel_weight",
    "every loss weight (pixel_weight, ssim_weight, adversarial_weight) is 0: nothing to train.",
  )
  require(
    not (train.get("norm_pix_loss") and (weights["ssim_weight"] or weights["adversarial_weight"])),
    f"{field}.norm_pix_loss",
    "predicts normalised patches, not images: the SSIM and adversarial terms need images; "
    "turn one of them off.",
  )
  if weights["adversarial_weight"] > 0:
    _number(f"{field}.predictor_lr", train.get("predictor_lr", 2e-4), 0.0, open_low=True)
  load_size = train.get("load_size") or 0
  require(load_size >= 0, f"{field}.load_size", f"must be >= 0 (0 = the model's), got {load_size}.")
  check_load_short_side(train.get("load_short_side", 0), f"{field}.load_short_side")
  _range(f"{field}.augment.crop_scale", tuple(train.augment.crop_scale), 0.0, 1.0)
  _range(f"{field}.augment.crop_ratio", tuple(train.augment.crop_ratio), 0.0)
  crop = train.augment.get("crop", "resized")
  require(
    crop in ("resized", "tile"),
    f"{field}.augment.crop",
    f"{crop!r} is not one of resized, tile.",
  )
  require(
    crop != "tile" or load_size > 0,
    f"{field}.load_size",
    "augment.crop='tile' cuts tiles of the model's size from images kept at load_size: "
    "set load_size larger than the model's input size (e.g. the tiling's image_size).",
  )


def check_load_short_side(value, field: str) -> None:
  """A training section's `load_short_side`: 0, -1 or a size in pixels (bounded).

  Raises:
    ConfigError: naming `field`.
  """
  require(
    isinstance(value, int) and not isinstance(value, bool) and -1 <= value <= MAX_SHORT_SIDE,
    field,
    f"must be 0 (square images at load_size), -1 (each image at its own size) or a short "
    f"side in pixels up to {MAX_SHORT_SIDE}, got {value!r}.",
  )


def validate_training_sources(sources, field: str) -> None:
  """Checks the training sources' `splits` (no file is read).

  Raises:
    ConfigError: an empty or unknown split name, or a folder's 'train' without normals.
  """
  for index, source in enumerate(sources):
    name = field if index == 0 else f"extra_data[{index - 1}]"
    splits = source.get("splits", "train")
    names = splits.split(",") if isinstance(splits, str) else list(splits)
    names = [str(n).strip() for n in names if str(n).strip()]
    require(
      bool(names) and all(n in SPLITS for n in names),
      f"{name}.splits",
      f"{splits!r}: give a comma-separated subset of {', '.join(SPLITS)}.",
    )
    if source.get("name") == "folder" and "train" in names:
      require(
        bool(source.get("normal_path")),
        f"{name}.normal_path",
        "is empty, but a folder's 'train' split is its normal images: set it, or use "
        f"{name}.splits=test (unlabelled images are trained on).",
      )


def is_finite_number(value) -> bool:
  """A real number (not a bool), neither NaN nor infinite."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

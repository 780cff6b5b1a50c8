"""Few-shot MAEDAY: the MAE adapted to the normal shots (LoRA or all weights), then scored
as zero-shot MAEDAY (spec section 1; `maeday_jax.few_shot`).

The artifact stores the merged (adapted) weights: scoring never needs the base
checkpoint again.
"""

from __future__ import annotations

import logging

import ml_collections
import numpy as np

from maeday_jax.detectors.maeday import ZeroShotMaeday
from maeday_jax.settings import few_shot as few_shot_settings

log = logging.getLogger("maeday_jax")


class LoraMaeday(ZeroShotMaeday):
  """MAEDAY after LoRA adaptation on the shots (rank 32 on every weight matrix, SGD,
  50 steps of 32 augmented masked copies by default: `config.train`)."""

  method = "maeday_lora"
  summary = "few-shot MAEDAY: LoRA-adapted MAE on the normal shots"
  finetune = "lora"
  needs_shots = True
  SECTIONS = {**ZeroShotMaeday.SECTIONS, "train": few_shot_settings.few_shot_train_config}

  @classmethod
  def validate(cls, config) -> None:
    from maeday_jax import recipe_checks

    super().validate(config)
    # Few-shot adaptation reads `train` with this method's fine-tuning mode.
    train = ml_collections.ConfigDict(config.train.to_dict())
    train.finetune = cls.finetune
    recipe_checks.validate_few_shot_train(train)

  def __init__(self, settings):
    super().__init__(settings)
    self.history: dict = {}

  def fit(self, normals, key) -> None:
    import jax

    from maeday_jax import few_shot

    model = self.model
    shots, heldout = normals.images(self.input_size)
    if len(shots) == 0:
      raise ValueError(f"{self.method} needs at least one normal shot to adapt on.")
    train = self.settings.train
    train.finetune = self.finetune
    base = self.state["mae"]
    record = {}
    if len(heldout):
      record["heldout_loss_before"] = few_shot.heldout_loss(model, base, heldout, key)
    merged, history = few_shot.adapt(
      model, base, shots, jax.random.fold_in(key, 1), train, workdir=normals.workdir
    )
    if len(heldout):
      record["heldout_loss_after"] = few_shot.heldout_loss(model, merged, heldout, key)
    losses = history["loss"]
    record.update(
      train_loss_first=losses[0] if losses else None,
      train_loss_last=losses[-1] if losses else None,
      compile_time_s=history["compile_time_s"],
      train_time_s=float(np.sum(history["step_time_s"])),
      trainable_params=history["trainable_params"],
      resumed_from_step=history["start_step"],
    )
    self.history = record
    self.state = {"mae": merged}
    self._weights = None  # Adapted weights are stored in the artifact.
    log.info(
      "%s: held-out loss %s -> %s; %d steps in %.1f s",
      self.method,
      record.get("heldout_loss_before"),
      record.get("heldout_loss_after"),
      len(losses),
      record["train_time_s"],
    )

  def record(self) -> dict:
    return {**super().record(), "weights": None, "adaptation": self.history}

  def restore(self, record: dict, state) -> None:
    self.history = record.get("adaptation", {})
    super().restore({**record, "weights": None}, state)


class FullFineTuneMaeday(LoraMaeday):
  """MAEDAY after fine-tuning every weight on the shots (the paper's Table 4 ablation;
  set `--config.train.learning_rate=1e-4` as the paper does)."""

  method = "maeday_full"
  summary = "few-shot MAEDAY: all MAE weights fine-tuned on the normal shots"
  finetune = "full"

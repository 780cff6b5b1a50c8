"""What few-shot adaptation trains: LoRA factors on a frozen model, or the weights.

A strategy is chosen once from the training config (`from_config`) and answers every
question that depends on it: which tree is trained (`split`), the loss of the model that
tree stands for (`loss`), and the plain parameters to score with (`merge`). Strategies
are frozen dataclasses, hashable, so a compiled train step can take one as a static
argument.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import traverse_util

from maeday_jax import lora, training
from maeday_jax.few_shot.loss import reconstruction_loss
from maeday_jax.models import MaskedAutoencoder
from maeday_jax.settings.few_shot import (
  FINETUNE_MODES,
  LORA_COMPUTE_MODES,
  LORA_RANK,
  LORA_TARGETS,
)

# Paper: 1e-2 for LoRA, 1e-4 for full fine-tuning (Table 4).
DEFAULT_LEARNING_RATES = {"lora": 1e-2, "full": 1e-4}


@dataclasses.dataclass(frozen=True)
class LoRA:
  """LoRA factors of rank `rank` at the kernels matching `targets`; the base is frozen.

  Attributes:
    rank, alpha, targets: see `maeday_jax.lora` (alpha None = rank, i.e. scale 1).
    compute: 'activations' (frozen layer + (x A) B inside the model, no gradient for the
      frozen kernels) or 'weights' (the model run on W + A B): same loss and gradients.
  """

  rank: int = LORA_RANK
  alpha: float | None = None
  targets: tuple[str, ...] = LORA_TARGETS
  compute: str = "activations"

  name = "lora"

  def split(self, params, key: jax.Array) -> tuple[Any, Any]:
    """(base, trainable): the whole model, and fresh LoRA factors (B = 0: no change yet)."""
    return params, lora.init(key, params, self.rank, self.targets)

  def effective_params(self, base, trainable):
    """The model parameters `trainable` on top of `base` stands for (differentiable)."""
    return lora.apply(base, trainable, self.alpha)

  def loss(self, model: MaskedAutoencoder, base, trainable, images, noise, mask_ratio: float):
    """`reconstruction_loss` of the adapted model; differentiable w.r.t. `trainable`."""
    if self.compute == "activations":
      with lora.on_activations(trainable, self.alpha):
        return reconstruction_loss(model, base, images, noise, mask_ratio)
    return reconstruction_loss(
      model, self.effective_params(base, trainable), images, noise, mask_ratio
    )

  def merge(self, base, trainable):
    """Plain model parameters for inference (the factors folded into the kernels)."""
    return lora.merge(base, trainable, self.alpha)


@dataclasses.dataclass(frozen=True)
class FullFineTune:
  """Every weight is trained but the fixed position tables (`training.FIXED_PARAMS`)."""

  name = "full"

  def split(self, params, key: jax.Array) -> tuple[Any, Any]:
    """(base, trainable): the fixed leaves, and every other leaf."""
    del key  # Nothing is initialised.
    return training.split_fixed(params)

  def effective_params(self, base, trainable):
    flat = traverse_util.flatten_dict(base)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)

  def loss(self, model: MaskedAutoencoder, base, trainable, images, noise, mask_ratio: float):
    return reconstruction_loss(
      model, self.effective_params(base, trainable), images, noise, mask_ratio
    )

  def merge(self, base, trainable):
    return self.effective_params(base, trainable)


Strategy = LoRA | FullFineTune


def check_finetune(config) -> str:
  """`config.finetune`, checked to be one of `settings.few_shot.FINETUNE_MODES`."""
  if config.finetune not in FINETUNE_MODES:
    raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {config.finetune!r}.")
  return config.finetune


def from_config(config) -> Strategy:
  """The strategy the training config (`settings.few_shot.few_shot_train_config`) asks for."""
  if check_finetune(config) == "full":
    return FullFineTune()
  compute = config.lora.get("compute", "activations")
  if compute not in LORA_COMPUTE_MODES:
    raise ValueError(f"lora.compute must be one of {LORA_COMPUTE_MODES}, got {compute!r}.")
  alpha = config.lora.alpha
  return LoRA(
    rank=int(config.lora.rank),
    alpha=None if alpha is None else float(alpha),
    targets=tuple(config.lora.targets),
    compute=str(compute),
  )

"""The MAE pre-training optimiser: AdamW with a warm-up + cosine learning rate.

Recipe of the official MAE (He et al., 2022, `main_pretrain.py`):
- learning rate `base_lr * batch_size / 256`, linear warm-up from 0, then a half-cosine
  decay to `min_lr` at the last step (per step, not per epoch);
- AdamW with betas (0.9, 0.95) and weight decay 0.05;
- no weight decay on normalisation scales, biases, position embeddings and the cls /
  mask tokens (the decay would pull them towards zero for no regularisation benefit);
- the sin-cos position embeddings are fixed: the optimiser never moves them.
"""

from __future__ import annotations

import dataclasses
import math

import optax
from flax import traverse_util

from maeday_jax import training

# Leaves with more than one dimension that still get no weight decay.
NO_DECAY_NAMES = ("cls_token", "mask_token", *training.FIXED_PARAMS)


def peak_learning_rate(base_lr: float, batch_size: int) -> float:
  """The linear scaling rule of MAE: `base_lr * batch_size / 256`."""
  return base_lr * batch_size / 256


def learning_rate_schedule(
  peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> optax.Schedule:
  """Linear warm-up from 0 to `peak_lr` over `warmup_steps`, then cosine to `min_lr`.

  lr(t) = peak * t / warmup                                          for t < warmup
  lr(t) = min + (peak - min) * (1 + cos(pi * (t - warmup) / (total - warmup))) / 2  after.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps must be positive, got {total_steps}.")
  warmup_steps = min(max(0, int(warmup_steps)), total_steps)
  if warmup_steps == total_steps:
    return optax.linear_schedule(0.0, peak_lr, max(1, warmup_steps))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=peak_lr,
    warmup_steps=warmup_steps,
    decay_steps=total_steps,
    end_value=min_lr,
  )


def reference_learning_rate(
  step: int, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0
) -> float:
  """The schedule's formula in plain Python (what the tests check `learning_rate_schedule`
  against, and what the official `lr_sched.adjust_learning_rate` computes per step)."""
  if step < warmup_steps:
    return peak_lr * step / warmup_steps
  progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
  return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _leaf_name(path: tuple[str, ...]) -> str:
  return path[-1]


def decay_mask(params) -> dict:
  """True for the leaves that get weight decay: Dense and conv kernels only.

  Excluded: every 1-D leaf (biases, LayerNorm scales and offsets), the cls and mask
  tokens and the position embeddings, whatever their shapes.
  """
  flat = traverse_util.flatten_dict(params)
  mask = {
    # Inside `multi_transform` the frozen leaves arrive as `MaskedNode`s (no ndim).
    path: getattr(leaf, "ndim", 0) > 1 and _leaf_name(path) not in NO_DECAY_NAMES
    for path, leaf in flat.items()
  }
  return traverse_util.unflatten_dict(mask)


def trainable_labels(params) -> dict:
  """'frozen' for the fixed position embeddings, 'trained' for every other leaf."""
  flat = traverse_util.flatten_dict(params)
  labels = {path: "frozen" if training.is_fixed(path) else "trained" for path in flat}
  return traverse_util.unflatten_dict(labels)


def make_optimizer(
  schedule: optax.Schedule,
  weight_decay: float = 0.05,
  b1: float = 0.9,
  b2: float = 0.95,
  grad_clip: float | None = None,
) -> optax.GradientTransformation:
  """AdamW with the MAE decay mask; position embeddings get no update at all.

  `grad_clip` (global norm) is off in the official recipe; it helps tiny batches.
  """
  adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  if grad_clip:
    adamw = optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
  # multi_transform keeps no Adam moments for the frozen leaves.
  return optax.multi_transform({"trained": adamw, "frozen": optax.set_to_zero()}, trainable_labels)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Everything the optimiser depends on, hashable (compiled steps are cached on it).

  Attributes:
    peak_lr: learning rate after warm-up (see `peak_learning_rate`).
    total_steps: length of the whole schedule.
    warmup_steps: linear warm-up steps from 0.
    min_lr: learning rate at the last step.
    weight_decay, b1, b2: AdamW settings.
    grad_clip: global-norm clip, 0 = off.
  """

  peak_lr: float
  total_steps: int
  warmup_steps: int
  min_lr: float = 0.0
  weight_decay: float = 0.05
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 0.0

  @classmethod
  def from_train(cls, train, peak_lr: float, total_steps: int, warmup_steps: int):
    """The optimiser of a config's `train` section (min_lr, weight_decay, b1, b2, grad_clip)."""
    return cls(
      peak_lr=float(peak_lr),
      total_steps=total_steps,
      warmup_steps=warmup_steps,
      min_lr=float(train.min_lr),
      weight_decay=float(train.weight_decay),
      b1=float(train.b1),
      b2=float(train.b2),
      grad_clip=float(train.get("grad_clip") or 0.0),
    )

  def schedule(self) -> optax.Schedule:
    return learning_rate_schedule(self.peak_lr, self.total_steps, self.warmup_steps, self.min_lr)

  def make(self) -> optax.GradientTransformation:
    return make_optimizer(
      self.schedule(), self.weight_decay, self.b1, self.b2, self.grad_clip or None
    )

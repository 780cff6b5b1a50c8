"""The few-shot optimiser: SGD with momentum and weight decay as PyTorch computes them."""

from __future__ import annotations

import functools

import optax

from maeday_jax.few_shot import strategy as strategy_lib


def learning_rate(config) -> float:
  """The configured learning rate, or the paper's default for the fine-tuning mode."""
  mode = strategy_lib.check_finetune(config)
  if config.learning_rate is not None:
    return float(config.learning_rate)
  return strategy_lib.DEFAULT_LEARNING_RATES[mode]


def make_optimizer(config) -> optax.GradientTransformation:
  """SGD with momentum and weight decay exactly as `torch.optim.SGD` computes them.

  PyTorch: g' = g + wd * w; buf = momentum * buf + g' (buf = g' on the first step, which
  a zero-initialised trace gives too); w -= lr * buf. `optax.sgd` has no weight decay, and
  `optax.add_decayed_weights` after the momentum would give AdamW-like decoupled decay.
  """
  return _sgd(float(config.weight_decay), float(config.momentum), learning_rate(config))


# Memoised so that equal settings give the same (hashable) optimiser object, and with it
# a cache hit for the compiled train step: one compilation serves every category and
# seed of an experiment.
@functools.lru_cache(maxsize=32)
def _sgd(weight_decay: float, momentum: float, lr: float) -> optax.GradientTransformation:
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.trace(decay=momentum, nesterov=False),
    optax.scale(-lr),
  )

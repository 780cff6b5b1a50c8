"""The model a job runs, from its `config.model` section (`settings.model.model_config`).

    model, params, source = build_model(config.model, jax.random.key(config.seed))

One function for every job: `checkpoint='random'` initialises `variant` (architecture
fields override it), anything else is loaded by `models.mae_import.load_mae`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from maeday_jax import models
from maeday_jax.config_errors import require
from maeday_jax.models import mae_import
from maeday_jax.settings import model as model_settings
from maeday_jax.weight_files import CheckpointError

log = logging.getLogger("maeday_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Backends whose matrix units run bfloat16 at several times their float32 rate.
_BFLOAT16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


def compute_dtype(name: str, backend: str | None = None):
  """The compute dtype a `model.dtype` setting stands for on `backend` (default: JAX's).

  'auto' is bfloat16 on GPUs and TPUs and float32 on CPUs (where bfloat16 matmuls are
  emulated and slower); parameters, LayerNorm statistics, the softmax and the error maps
  stay float32 either way.
  """
  if name == "auto":
    backend = backend or jax.default_backend()
    return jnp.bfloat16 if backend in _BFLOAT16_BACKENDS else jnp.float32
  return DTYPES[name]


# Head counts are not in the tensor shapes: with a checkpoint they are passed to the loader.
_HEAD_FIELDS = ("num_heads", "decoder_num_heads")


def _architecture_overrides(model_config: ml_collections.ConfigDict) -> dict:
  return {
    field: model_config.get(field)
    for field in models.ARCH_FIELDS
    if model_config.get(field) is not None
  }


def validate_model_config(model_config: ml_collections.ConfigDict) -> None:
  """Checks the settings that need no file access (before any long work starts)."""
  require(
    model_config.dtype in model_settings.DTYPES,
    "model.dtype",
    f"{model_config.dtype!r} is not one of {', '.join(model_settings.DTYPES)}.",
  )
  attention = model_config.get("attention", "auto")
  require(
    attention in model_settings.ATTENTION_IMPLEMENTATIONS,
    "model.attention",
    f"{attention!r} is not one of {', '.join(model_settings.ATTENTION_IMPLEMENTATIONS)}.",
  )
  require(
    bool(model_config.checkpoint),
    "model.checkpoint",
    f"is empty; give a known name, a path, or {model_settings.RANDOM_WEIGHTS!r} for randomly "
    "initialised weights of model.variant.",
  )
  if model_config.checkpoint == model_settings.RANDOM_WEIGHTS:
    require(
      model_config.variant in models.VARIANTS,
      "model.variant",
      f"{model_config.variant!r} is not one of {sorted(models.VARIANTS)}.",
    )


def build_model(model_config: ml_collections.ConfigDict, key: jax.Array):
  """The model and its parameters as `model_config` says; returns (model, params, source).

  `key` initialises random weights (unused for a checkpoint); `source` names where the
  weights came from ('random:<variant>' or the checkpoint).

  Raises:
    ConfigError: a setting is invalid, or architecture fields contradict the checkpoint.
    CheckpointError: the checkpoint cannot be found or read (the message says how to
      pass another one).
  """
  validate_model_config(model_config)
  dtype = compute_dtype(model_config.dtype)
  attention = model_config.get("attention", "auto")
  overrides = _architecture_overrides(model_config)
  if model_config.checkpoint == model_settings.RANDOM_WEIGHTS:
    model = models.create(model_config.variant, dtype=dtype, attention=attention, **overrides)
    return (
      model,
      models.init_params(model, key),
      f"{model_settings.RANDOM_WEIGHTS}:{model_config.variant}",
    )
  try:
    model, params = mae_import.load_mae(
      model_config.checkpoint,
      **{field: overrides.get(field) for field in _HEAD_FIELDS},
      dtype=dtype,
      cache_dir=model_config.get("cache_dir") or None,
      attention=attention,
    )
  except CheckpointError as e:
    raise CheckpointError(
      f"{e}\n(set the checkpoint with --config.model.checkpoint=PATH_OR_NAME)"
    ) from e
  arch = models.architecture(model)
  conflicts = {f: (v, arch[f]) for f, v in overrides.items() if v != arch[f]}
  require(
    not conflicts,
    "model",
    f"the overrides {conflicts} (value, checkpoint's) contradict the checkpoint "
    f"{model_config.checkpoint}; leave them unset (None) when loading it.",
  )
  return model, params, str(model_config.checkpoint)

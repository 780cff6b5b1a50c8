"""The model a job runs, from its `config.model` section (`settings.model.model_config`).

    model, params, source = build_model(config.model, jax.random.key(config.seed))

One function for every job: `checkpoint='random'` initialises `variant` (architecture
fields override it), anything else is loaded by `models.mae_import.load_mae`.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import ml_collections

from maeday_jax import models
from maeday_jax.config_errors import ConfigError, require
from maeday_jax.models import mae_import
from maeday_jax.settings import model as model_settings
from maeday_jax.weight_files import CheckpointError

log = logging.getLogger("maeday_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Backends whose matrix units run bfloat16 at several times their float32 rate.
_BFLOAT16_BACKENDS = ("gpu", "cuda", "rocm", "tpu")
# x86 CPU flags (Linux /proc/cpuinfo) of bfloat16 dot-product instructions, which XLA:CPU
# runs at about twice its float32 rate when products accumulate in float32
# (`models.mixed_matmul`): AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later)
# and AMX-BF16 (Intel Sapphire Rapids and later).
_BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_multiplies_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this machine's CPU has bfloat16 dot-product instructions (read from `cpuinfo`;
  False where that file does not exist or names none)."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      for line in f:
        if line.startswith("flags"):
          return bool(set(line.split(":", 1)[-1].split()) & set(_BFLOAT16_CPU_FLAGS))
  except OSError:
    pass
  return False


def compute_dtype(name: str, backend: str | None = None):
  """The compute dtype a `model.dtype` setting stands for on `backend` (default: JAX's).

  'auto' is bfloat16 on GPUs, TPUs and CPUs with bfloat16 instructions
  (`cpu_multiplies_bfloat16`), float32 on other CPUs (where bfloat16 matmuls are emulated
  and slower); parameters, LayerNorm statistics, the softmax and the error maps stay
  float32 either way.
  """
  if name == "auto":
    backend = backend or jax.default_backend()
    native = backend in _BFLOAT16_BACKENDS or (backend == "cpu" and cpu_multiplies_bfloat16())
    return jnp.bfloat16 if native else jnp.float32
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
  overrides = _architecture_overrides(model_config)
  for field, value in overrides.items():
    require(
      value > 0 and not isinstance(value, bool),
      f"model.{field}",
      f"must be a positive number (or unset: the variant's or the checkpoint's), got {value}.",
    )
  require(
    overrides.get("in_chans", 3) == 3,
    "model.in_chans",
    f"must be 3: every image is read as RGB, got {overrides.get('in_chans')}.",
  )
  if model_config.checkpoint == model_settings.RANDOM_WEIGHTS:
    require(
      model_config.variant in models.VARIANTS,
      "model.variant",
      f"{model_config.variant!r} is not one of {sorted(models.VARIANTS)}.",
    )
    _check_architecture(random_architecture(model_config), set(overrides))
  elif "img_size" in overrides and "patch_size" in overrides:
    _check_architecture(overrides, set(overrides))


def random_architecture(model_config: ml_collections.ConfigDict) -> dict:
  """The architecture fields of `checkpoint='random'`: the variant's, overridden."""
  model = models.create(model_config.variant, **_architecture_overrides(model_config))
  return models.architecture(model)  # A module's fields: nothing is built or initialised.


def _check_architecture(arch: dict, given: set[str]) -> None:
  """Checks the shapes the MAE's layers need (the model would fail on its first call)."""

  def named(*fields: str) -> str:
    # Name the fields the user set: the variant's own values are not theirs to fix.
    return "model." + next((f for f in fields if f in given), fields[0])

  img, patch = arch["img_size"], arch["patch_size"]
  require(
    img % patch == 0,
    named("img_size", "patch_size"),
    f"img_size {img} is not a multiple of patch_size {patch}: the image must split into "
    f"whole patches (e.g. img_size={max(patch, img // patch * patch)}).",
  )
  for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
    if width not in arch or heads not in arch:
      continue
    require(
      arch[width] % 4 == 0,
      named(width),
      f"{arch[width]} is not a multiple of 4 (the 2-D sin-cos position table needs it).",
    )
    require(
      arch[width] % arch[heads] == 0,
      named(heads, width),
      f"{width} {arch[width]} is not divisible by {heads} {arch[heads]}.",
    )


def known_num_patches(model_config: ml_collections.ConfigDict) -> int | None:
  """The model's patch count when the settings alone say it (random weights, or a
  checkpoint with `img_size` and `patch_size` given), else None (read from the file)."""
  if model_config.checkpoint == model_settings.RANDOM_WEIGHTS:
    if model_config.variant not in models.VARIANTS:
      return None
    arch = random_architecture(model_config)
  else:
    arch = _architecture_overrides(model_config)
  if "img_size" not in arch or "patch_size" not in arch or arch["img_size"] % arch["patch_size"]:
    return None
  return (arch["img_size"] // arch["patch_size"]) ** 2


def check_visible_patches(settings, num_patches: int) -> None:
  """Refuses `settings.mask_ratio` when a stratified mask schedule would show no patch
  of the model's `num_patches`.

  A stratified schedule (`models.masking.stratified_noise`) shows each mask
  K = int(L * (1 - mask_ratio)) patches and groups the masks so that their visible
  patches partition the image: it needs K >= 1.

  Raises:
    ConfigError: naming `mask_ratio` and the largest ratio that works.
  """
  if settings.get("masking", "random") != "stratified":
    return
  from maeday_jax.models import masking

  if masking.num_visible(num_patches, float(settings.mask_ratio)) < 1:
    # Rounded down, so that the ratio shown does leave one patch.
    largest = math.floor((1 - 1 / num_patches) * 1e4) / 1e4
    raise ConfigError(
      f"--config.mask_ratio: {settings.mask_ratio} leaves no visible patch of the model's "
      f"{num_patches} under --config.masking=stratified, whose groups of masks partition "
      f"the image into visible sets; use a mask_ratio of at most {largest:g} "
      "(or --config.masking=random)."
    )


def validate_masking(settings, model_config: ml_collections.ConfigDict) -> None:
  """`check_visible_patches` where the patch count is known before loading the model
  (`known_num_patches`); a checkpoint's is checked once it is loaded."""
  num_patches = known_num_patches(model_config)
  if num_patches is not None and 0.0 <= settings.mask_ratio < 1.0:
    check_visible_patches(settings, num_patches)


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

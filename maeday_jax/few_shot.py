"""Few-shot adaptation: fine-tune the MAE on the k normal shots, then score zero-shot.

Spec §1: LoRA (rank 32) on every weight matrix, base weights frozen; SGD with learning
rate 1e-2, momentum 0.9 and PyTorch-style weight decay 0.05; 50 iterations of batch 32,
the shots repeated to fill the batch, every copy with its own random mask (ratio 0.75)
and its own random crop and rotation; loss = MSE between the decoder output and the
pixel target over all patches. The Table 4 ablation fine-tunes all weights instead
(`finetune='full'`, learning rate 1e-4).

    config = few_shot.get_train_config()
    merged, history = few_shot.adapt(model, params, shots, key, config, workdir=workdir)
    maps = zero_shot.anomaly_maps(model, merged, images, key)

The update step is one compiled, donated function over a 1-D device mesh: parameters
and the shots are replicated, the 32 copies are built, augmented and masked on device
and split over the mesh. Step s draws its random numbers from `fold_in(key, s)` (row i
for copy i), so a run gives the same result on any number of devices and when it is
resumed from a checkpoint.
"""

import functools
import logging
import os
import pathlib
import re
import shutil
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from ml_collections import config_dict

from maeday_jax import augment, lora, parallel
from maeday_jax.checkpoints import orbax_format
from maeday_jax.data.preprocess import normalize
from maeday_jax.models import MaskedAutoencoder, architecture, masking, num_params

logger = logging.getLogger(__name__)

FINETUNE_MODES = ("lora", "full")
# How a LoRA step computes the adapted model (see `maeday_jax.lora.on_activations`):
# "activations" (frozen layer + (x A) B, no frozen-kernel gradients; the default) or
# "weights" (the model run on W + A B; the same values, more backward work at ViT widths).
LORA_COMPUTE_MODES = ("activations", "weights")
# Paper: 1e-2 for LoRA, 1e-4 for full fine-tuning (Table 4).
DEFAULT_LEARNING_RATES = {"lora": 1e-2, "full": 1e-4}
# Never trained in full fine-tuning: MAE's position tables are fixed sin-cos (the official
# model sets requires_grad=False). The model stop-gradients them, but weight decay would
# still shrink them, so they are kept out of the optimiser altogether.
FROZEN_IN_FULL_FINETUNE = (r"pos_embed", r"decoder_pos_embed")
CHECKPOINT_DIR = "checkpoints"
MERGED_DIR = "merged"


def get_train_config() -> config_dict.ConfigDict:
  """Default few-shot training settings (spec §1); a `train` section for command configs.

  Fields:
    finetune: 'lora' (default) or 'full' (paper Table 4 ablation).
    steps: optimisation steps (iterations).
    batch_size: copies of the shots per step; a multiple of the number of devices.
    learning_rate: None = 1e-2 for LoRA, 1e-4 for full fine-tuning.
    momentum, weight_decay: SGD with PyTorch semantics (decay added to the gradient).
    mask_ratio: fraction of patches masked in each copy.
    lora.rank, lora.alpha, lora.targets: LoRA rank, alpha (None = rank, i.e. scale 1) and
      regular expressions over '/'-joined parameter paths (see `maeday_jax.lora`).
    lora.compute: 'activations' (default) or 'weights', how the step computes the adapted
      model (`LORA_COMPUTE_MODES`); the results agree, the speed differs.
    augment.max_rotation_deg, augment.min_crop_scale, augment.max_crop_scale,
      augment.fill_mode: see `maeday_jax.augment`.
    checkpoint_every: save a resumable checkpoint every this many steps when a workdir is
      given (the last step is always saved); 0 = only the last step.
    max_checkpoints: resumable checkpoints kept.
  """
  config = config_dict.ConfigDict()
  config.finetune = "lora"
  config.steps = 50
  config.batch_size = 32
  config.learning_rate = config_dict.placeholder(float)
  config.momentum = 0.9
  config.weight_decay = 0.05
  config.mask_ratio = 0.75
  config.lora = config_dict.ConfigDict(
    dict(
      rank=lora.DEFAULT_RANK,
      alpha=config_dict.placeholder(float),
      targets=lora.DEFAULT_TARGETS,
      compute="activations",
    )
  )
  config.augment = config_dict.ConfigDict(
    dict(
      max_rotation_deg=augment.DEFAULT_MAX_ROTATION_DEG,
      min_crop_scale=augment.DEFAULT_CROP_SCALE[0],
      max_crop_scale=augment.DEFAULT_CROP_SCALE[1],
      fill_mode=augment.DEFAULT_FILL_MODE,
    )
  )
  config.checkpoint_every = 10
  config.max_checkpoints = 2
  return config


def _check_mode(config) -> str:
  if config.finetune not in FINETUNE_MODES:
    raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {config.finetune!r}.")
  return config.finetune


def learning_rate(config) -> float:
  """The configured learning rate, or the paper's default for the fine-tuning mode."""
  mode = _check_mode(config)
  if config.learning_rate is not None:
    return float(config.learning_rate)
  return DEFAULT_LEARNING_RATES[mode]


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


class StepSettings(NamedTuple):
  """The part of the training config that the compiled step depends on (hashable)."""

  finetune: str
  batch_size: int
  mask_ratio: float
  lora_alpha: float | None
  lora_compute: str
  max_rotation_deg: float
  crop_scale: tuple[float, float]
  fill_mode: str

  @classmethod
  def from_config(cls, config) -> "StepSettings":
    if isinstance(config, cls):
      return config
    aug = config.augment
    compute = config.lora.get("compute", "activations")
    if compute not in LORA_COMPUTE_MODES:
      raise ValueError(f"lora.compute must be one of {LORA_COMPUTE_MODES}, got {compute!r}.")
    return cls(
      finetune=_check_mode(config),
      batch_size=int(config.batch_size),
      mask_ratio=float(config.mask_ratio),
      lora_alpha=None if config.lora.alpha is None else float(config.lora.alpha),
      lora_compute=str(compute),
      max_rotation_deg=float(aug.max_rotation_deg),
      crop_scale=(float(aug.min_crop_scale), float(aug.max_crop_scale)),
      fill_mode=str(aug.fill_mode),
    )


def reconstruction_loss(
  model: MaskedAutoencoder,
  params: Any,
  images: jax.Array,
  noise: jax.Array,
  mask_ratio: float = 0.75,
) -> jax.Array:
  """MSE between the reconstruction of every patch and the pixels, as a scalar.

  `images` (B, H, W, 3) normalised; `noise` (B, L) sets the masks. Unlike MAE
  pre-training, visible patches count too and there is no per-patch normalisation of the
  target: scoring compares raw reconstructions to raw pixels over the whole image.
  """
  pred = model.apply({"params": params}, images, noise=noise, mask_ratio=mask_ratio)
  target = model.patchify(images.astype(jnp.float32))
  return jnp.mean((pred - target) ** 2)


def as_model_input(model: MaskedAutoencoder, images) -> jax.Array:
  """Checks (k, S, S, 3) images at the model size; normalises uint8 ones (ImageNet stats)."""
  shape = np.shape(images)
  size = model.img_size
  if len(shape) != 4 or shape[1:] != (size, size, model.in_chans):
    raise ValueError(
      f"Expected images of shape (k, {size}, {size}, {model.in_chans}) for this model, got "
      f"{shape}. Resize and normalise them with the data pipeline first (or pass uint8 "
      "RGB at the model size)."
    )
  if shape[0] == 0:
    raise ValueError("No images given: few-shot adaptation needs at least one shot.")
  dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
  if dtype == np.uint8:
    return jnp.asarray(normalize(np.asarray(images)))
  return jnp.asarray(images, jnp.float32)


@functools.partial(jax.jit, static_argnames=("model", "mask_ratio", "num_masks", "mesh"))
def _heldout_loss(params, images, key, *, model, mask_ratio, num_masks, mesh):
  rows = images.shape[0] * num_masks
  noise = masking.random_noise(key, (rows,), model.num_patches)
  images = jnp.repeat(images, num_masks, axis=0)  # image b, mask m at row b * M + m
  if rows % mesh.devices.size == 0:  # Split the work when it divides evenly.
    images, noise = jax.lax.with_sharding_constraint((images, noise), parallel.batch_sharded(mesh))
  return reconstruction_loss(model, params, images, noise, mask_ratio)


def heldout_loss(
  model: MaskedAutoencoder,
  params: Any,
  images,
  key: jax.Array,
  mask_ratio: float = 0.75,
  num_masks: int = 4,
  mesh=None,
) -> float:
  """Reconstruction loss on held-out normal images, averaged over `num_masks` masks each.

  The masks depend only on `key` and the number of images, so two parameter sets
  compared with the same key and images see the same masks. `images`: (B, H, W, 3)
  normalised, or uint8 RGB; all B * num_masks reconstructions run in one batch.
  Parameters are placed on `mesh` (default: all devices) first, so base and adapted
  parameters share one compilation whatever devices they came from.
  """
  mesh = parallel.data_mesh() if mesh is None else mesh
  images = parallel.replicate(as_model_input(model, images), mesh)
  params = parallel.replicate(params, mesh)
  loss = _heldout_loss(
    params, images, key, model=model, mask_ratio=mask_ratio, num_masks=num_masks, mesh=mesh
  )
  return float(loss)


def training_batch(
  model: MaskedAutoencoder, shots: jax.Array, key: jax.Array, config, mesh=None
) -> tuple[jax.Array, jax.Array]:
  """One step's batch: `batch_size` augmented copies of the shots and their mask noise.

  Copy i is shot `i % k`, with its own crop, rotation and mask noise (row i of one
  uniform draw from `key`); with a mesh, the copies are split over its data axis from the
  start, so each device builds only its own. `config`: the training config or its
  `StepSettings`. Returns images (B, H, W, 3) and noise (B, L).
  """
  settings = StepSettings.from_config(config)
  # One draw for the whole batch: row i = copy i's crop/rotation numbers, then its mask
  # noise. Threefry is partitionable (JAX's default), so the values do not depend on how
  # the rows are split over devices; one draw also compiles far faster than one per copy.
  uniforms = jax.random.uniform(
    key, (settings.batch_size, augment.NUM_UNIFORMS + model.num_patches), jnp.float32
  )
  copies = jnp.arange(settings.batch_size)
  if mesh is not None:
    uniforms, copies = jax.lax.with_sharding_constraint(
      (uniforms, copies), parallel.batch_sharded(mesh)
    )
  images = augment.augment_batch(
    shots[copies % shots.shape[0]],
    uniforms[:, : augment.NUM_UNIFORMS],
    max_rotation_deg=settings.max_rotation_deg,
    crop_scale=settings.crop_scale,
    fill_mode=settings.fill_mode,
  )
  return images, uniforms[:, augment.NUM_UNIFORMS :]


# How the trained tree maps to model parameters, per fine-tuning mode. In LoRA mode the
# trained tree is the LoRA tree and `base` the whole model; in full mode the trained tree
# is every parameter but the frozen ones, and `base` holds the frozen ones.


def _frozen_paths(params) -> set[tuple[str, ...]]:
  flat = traverse_util.flatten_dict(params)
  patterns = [re.compile(p) for p in FROZEN_IN_FULL_FINETUNE]
  return {p for p in flat if any(r.fullmatch("/".join(p)) for r in patterns)}


def split_params(params, key: jax.Array, config) -> tuple[Any, Any]:
  """Returns (base, trainable) for the mode: (params, fresh LoRA) or (frozen, the rest)."""
  if _check_mode(config) == "lora":
    return params, lora.init(key, params, config.lora.rank, tuple(config.lora.targets))
  flat = traverse_util.flatten_dict(params)
  frozen = _frozen_paths(params)
  base = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p in frozen})
  trainable = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in frozen})
  return base, trainable


def effective_params(base, trainable, config):
  """The model parameters that `trainable` on top of `base` stand for (differentiable).

  `config`: the training config or its `StepSettings`.
  """
  settings = StepSettings.from_config(config)
  if settings.finetune == "lora":
    return lora.apply(base, trainable, settings.lora_alpha)
  flat = traverse_util.flatten_dict(base)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


def training_loss(
  model: MaskedAutoencoder, base, trainable, images: jax.Array, noise: jax.Array, config
) -> jax.Array:
  """`reconstruction_loss` of the model that `trainable` on top of `base` stands for.

  Differentiable with respect to `trainable`. In LoRA mode with `lora.compute =
  'activations'` the low-rank updates act on the layers' inputs (`lora.on_activations`),
  otherwise the model runs on `effective_params`; both give the same loss and gradients.
  `config`: the training config or its `StepSettings`.
  """
  settings = StepSettings.from_config(config)
  if settings.finetune == "lora" and settings.lora_compute == "activations":
    with lora.on_activations(trainable, settings.lora_alpha):
      return reconstruction_loss(model, base, images, noise, settings.mask_ratio)
  params = effective_params(base, trainable, settings)
  return reconstruction_loss(model, params, images, noise, settings.mask_ratio)


def merge_params(base, trainable, config):
  """Plain model parameters for inference (LoRA folded into the weights)."""
  settings = StepSettings.from_config(config)
  if settings.finetune == "lora":
    return lora.merge(base, trainable, settings.lora_alpha)
  return effective_params(base, trainable, settings)


def init_state(trainable, optimizer: optax.GradientTransformation) -> dict:
  """Training state: the trained tree, the optimiser state and the step counter."""
  return {
    "trainable": trainable,
    "opt_state": optimizer.init(trainable),
    "step": jnp.zeros((), jnp.int32),
  }


@functools.partial(jax.jit, static_argnames=("finetune", "rank", "targets", "optimizer", "mesh"))
def _initial_state(params, key, *, finetune, rank, targets, optimizer, mesh):
  """(base, state) placed on `mesh`, in one compiled call (eager set-up would compile
  every small initialiser op by op)."""
  config = config_dict.ConfigDict(dict(finetune=finetune, lora=dict(rank=rank, targets=targets)))
  base, trainable = split_params(params, key, config)
  # The state is donated to the train step: a copy keeps the caller's weights alive
  # when they are trained directly (full fine-tuning).
  trainable = jax.tree.map(jnp.copy, trainable)
  whole = parallel.replicated(mesh)
  return jax.lax.with_sharding_constraint((base, init_state(trainable, optimizer)), whole)


@functools.partial(
  jax.jit, static_argnames=("model", "optimizer", "mesh", "settings"), donate_argnums=(0,)
)
def _train_step(state, base, shots, key, *, model, optimizer, mesh, settings):
  images, noise = training_batch(
    model, shots, jax.random.fold_in(key, state["step"]), settings, mesh
  )

  def loss_fn(trainable):
    return training_loss(model, base, trainable, images, noise, settings)

  loss, grads = jax.value_and_grad(loss_fn)(state["trainable"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["trainable"])
  new_state = {
    "trainable": optax.apply_updates(state["trainable"], updates),
    "opt_state": opt_state,
    "step": state["step"] + 1,
  }
  # Parameters and optimiser state stay whole on every device (data parallelism).
  whole = parallel.replicated(mesh)
  return jax.lax.with_sharding_constraint((new_state, loss), whole)


def make_train_step(
  model: MaskedAutoencoder, optimizer: optax.GradientTransformation, mesh, config
) -> Callable:
  """One compiled, data-parallel update: `step(state, base, shots, key) -> (state, loss)`.

  `state` (from `init_state`) is donated; `base`, the normalised `shots` (k, H, W, 3) and
  the run's `key` should be placed on the mesh with `parallel.replicate`. The step's key
  is `fold_in(key, state['step'])`; the batch is built on device (`training_batch`) and
  split over `mesh`; the compiler averages the gradients over the whole batch.

  Steps for the same model, optimiser (`make_optimizer` returns the same object for the
  same settings), mesh and step settings share one compilation.
  """
  return functools.partial(_train_step, **_step_statics(model, optimizer, mesh, config))


def lower_train_step(
  model: MaskedAutoencoder, optimizer: optax.GradientTransformation, mesh, config, *inputs
) -> jax.stages.Lowered:
  """`make_train_step`, traced and lowered for `inputs` = (state, base, shots, key).

  `.compile()` gives the step compiled ahead of time, called like the step with arguments
  of the same shapes and shardings; lowering and compiling apart lets callers (`adapt`,
  benchmarks) time them apart from the steps.
  """
  return _train_step.lower(*inputs, **_step_statics(model, optimizer, mesh, config))


def _step_statics(model, optimizer, mesh, config) -> dict:
  settings = StepSettings.from_config(config)
  return dict(model=model, optimizer=optimizer, mesh=mesh, settings=settings)


def _typed_key(key: jax.Array) -> jax.Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


def _to_host(tree):
  """NumPy copies of replicated arrays (one local replica each; works on every host)."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True)
  return ocp.CheckpointManager(workdir / CHECKPOINT_DIR, options=options)


def _restore(manager: ocp.CheckpointManager, step: int, state: dict, key_data: np.ndarray):
  """The saved training state (host arrays), checked against this run's shapes and key."""
  target = {"state": _to_host(state), "key_data": key_data}
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # Orbax raises many types; all mean the same to a user.
    raise ValueError(
      f"{manager.directory}: could not resume from step {step} ({type(e).__name__}: {e}). "
      "The checkpoint was written with a different model or fine-tuning configuration; "
      "use a new workdir."
    ) from e
  if not np.array_equal(np.asarray(restored["key_data"]), key_data):
    raise ValueError(
      f"{manager.directory}: the checkpointed run used a different PRNG key (seed) than "
      "this one; resuming would mix two runs. Use the same seed or a new workdir."
    )
  return restored["state"]


def _save_merged(directory: pathlib.Path, model: MaskedAutoencoder, params, source: str):
  """Writes the merged model (every process calls this; see `orbax_format.save`)."""
  if directory.exists() and not orbax_format.is_converted(directory):
    raise FileExistsError(f"{directory} exists and is not a merged model; move it away.")
  parallel.barrier(f"maeday_jax: checked {directory} for replacement")
  if directory.exists() and jax.process_index() == 0:
    shutil.rmtree(directory)  # Our own output of an earlier (identical) run.
  parallel.barrier(f"maeday_jax: cleared {directory}")
  arch = architecture(model)
  orbax_format.save(directory, arch, params, source=source)


def adapt(
  model: MaskedAutoencoder,
  params: Any,
  shots,
  key: jax.Array,
  config: config_dict.ConfigDict | None = None,
  mesh=None,
  workdir: str | os.PathLike | None = None,
) -> tuple[Any, dict]:
  """Fine-tunes `params` on the normal `shots`; returns (merged parameters, history).

  Args:
    model: the MAE.
    params: its pre-trained parameters (not modified).
    shots: (k, S, S, 3) normal images at the model size, normalised float or uint8 RGB.
    key: PRNG key of the run (LoRA initialisation, augmentation, masks).
    config: `get_train_config()` or a modified copy.
    mesh: device mesh (default: all devices); `batch_size` must divide over it.
    workdir: where to keep resumable checkpoints (`checkpoints/<step>`: the trained tree,
      i.e. the LoRA tree or the fine-tuned weights, the optimiser state, the step and the
      key) and the final merged model (`merged/`, loadable by `checkpoints.load_mae`). A
      run finds its latest checkpoint there and continues from it. None: no files.

  Returns:
    merged: plain parameters of the adapted model (same tree as `params`).
    history: `step` and `loss` (the training loss of each step run here, before its
      update), `step_time_s`, `compile_time_s`, `total_time_s`, `start_step` (> 0 after a
      resume) and `trainable_params`.
  """
  config = get_train_config() if config is None else config
  mesh = parallel.data_mesh() if mesh is None else mesh
  _check_mode(config)
  if config.batch_size % mesh.devices.size:
    raise ValueError(
      f"batch_size={config.batch_size} must be a multiple of the number of devices "
      f"({mesh.devices.size})."
    )
  start = time.perf_counter()
  shots = parallel.replicate(as_model_input(model, shots), mesh)
  init_key, run_key = jax.random.split(_typed_key(key))
  key_data = np.asarray(jax.random.key_data(run_key))  # Checkpointed, to check resumes.
  run_key = parallel.replicate(run_key, mesh)
  optimizer = make_optimizer(config)
  base, state = _initial_state(
    params,
    init_key,
    finetune=config.finetune,
    rank=int(config.lora.rank),
    targets=tuple(config.lora.targets),
    optimizer=optimizer,
    mesh=mesh,
  )

  manager, start_step = None, 0
  if workdir is not None:
    workdir = pathlib.Path(workdir).expanduser().absolute()
    manager = _checkpoint_manager(workdir, config)
    latest = manager.latest_step()
    if latest is not None:
      state = parallel.replicate(_restore(manager, latest, state, key_data), mesh)
      start_step = int(state["step"])
      if start_step > config.steps:
        raise ValueError(
          f"{workdir} holds a run that is already at step {start_step}, beyond steps="
          f"{config.steps}; use a new workdir or at least {start_step} steps."
        )
      logger.info("Resuming few-shot adaptation from step %d in %s.", start_step, workdir)

  t0 = time.perf_counter()
  if start_step < config.steps:  # A finished run only needs merging.
    lowered = lower_train_step(model, optimizer, mesh, config, state, base, shots, run_key)
    compiled = lowered.compile()
  history = {
    "step": [],
    "loss": [],
    "step_time_s": [],
    "compile_time_s": time.perf_counter() - t0,
    "start_step": start_step,
    "trainable_params": num_params(state["trainable"]),
  }
  every = config.checkpoint_every
  for step in range(start_step, config.steps):
    t0 = time.perf_counter()
    state, loss = compiled(state, base, shots, run_key)
    loss = float(loss)  # Waits for the step: honest per-step timing.
    history["step"].append(step + 1)
    history["loss"].append(loss)
    history["step_time_s"].append(time.perf_counter() - t0)
    if not np.isfinite(loss):
      raise FloatingPointError(
        f"Few-shot loss became {loss} at step {step + 1}; lower the learning rate "
        f"(now {learning_rate(config)})."
      )
    done = step + 1
    if manager is not None and (done == config.steps or (every and done % every == 0)):
      # Host copies: the next step donates the device buffers, and Orbax would compile a
      # per-device slicing program for every replicated array shape (seconds) to save them.
      host_state = _to_host(state)
      manager.save(done, args=ocp.args.StandardSave({"state": host_state, "key_data": key_data}))
    if done % 10 == 0 or done == config.steps:
      logger.info("few-shot step %d/%d: loss %.5f", done, config.steps, loss)

  merged = merge_params(base, state["trainable"], config)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
    _save_merged(
      workdir / MERGED_DIR,
      model,
      _to_host(merged),
      source=f"few-shot {config.finetune} adaptation, {config.steps} steps",
    )
  history["total_time_s"] = time.perf_counter() - start
  return merged, history

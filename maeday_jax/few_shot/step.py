"""One few-shot update: build the batch on device, differentiate, apply SGD.

The update is one compiled, donated function over a 1-D device mesh: parameters and the
shots are replicated, the copies are built, augmented and masked on device and split
over the mesh. Step s draws its random numbers from `fold_in(key, s)` (row i for copy
i), so a run gives the same result on any number of devices and when it is resumed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from maeday_jax import augment, parallel, training
from maeday_jax.few_shot import strategy as strategy_lib
from maeday_jax.models import MaskedAutoencoder


class StepSettings(NamedTuple):
  """What the compiled step depends on (hashable), built once from the training config.

  Attributes:
    strategy: what is trained (`strategy.LoRA` or `strategy.FullFineTune`).
    batch_size: augmented copies of the shots per step.
    mask_ratio: fraction of patches masked in each copy.
    max_rotation_deg, crop_scale, fill_mode: the augmentation (`maeday_jax.augment`).
  """

  strategy: strategy_lib.Strategy
  batch_size: int
  mask_ratio: float
  max_rotation_deg: float
  crop_scale: tuple[float, float]
  fill_mode: str

  @classmethod
  def from_config(cls, config) -> StepSettings:
    """The settings of `settings.few_shot.few_shot_train_config()` (or a modified copy)."""
    aug = config.augment
    return cls(
      strategy=strategy_lib.from_config(config),
      batch_size=int(config.batch_size),
      mask_ratio=float(config.mask_ratio),
      max_rotation_deg=float(aug.max_rotation_deg),
      crop_scale=(float(aug.min_crop_scale), float(aug.max_crop_scale)),
      fill_mode=str(aug.fill_mode),
    )


def training_batch(
  model: MaskedAutoencoder, shots: jax.Array, key: jax.Array, settings: StepSettings, mesh=None
) -> tuple[jax.Array, jax.Array]:
  """One step's batch: `batch_size` augmented copies of the shots and their mask noise.

  Copy i is shot `i % k`, with its own crop, rotation and mask noise (row i of one
  uniform draw from `key`); with a mesh, the copies are split over its data axis from the
  start, so each device builds only its own. Returns images (B, H, W, 3), noise (B, L).
  """
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


@functools.partial(jax.jit, static_argnames=("strategy", "optimizer", "mesh"))
def initial_state(params, key, *, strategy, optimizer, mesh):
  """(base, state) for `strategy`, placed on `mesh`, in one compiled call (eager set-up
  would compile every small initialiser op by op)."""
  base, trainable = strategy.split(params, key)
  # The state is donated to the train step: a copy keeps the caller's weights alive
  # when they are trained directly (full fine-tuning).
  trainable = jax.tree.map(jnp.copy, trainable)
  whole = parallel.replicated(mesh)
  return jax.lax.with_sharding_constraint((base, training.init_state(trainable, optimizer)), whole)


@functools.partial(
  jax.jit, static_argnames=("model", "optimizer", "mesh", "settings"), donate_argnums=(0,)
)
def _train_step(state, base, shots, key, *, model, optimizer, mesh, settings):
  images, noise = training_batch(
    model, shots, jax.random.fold_in(key, state["step"]), settings, mesh
  )

  def loss_fn(trainable):
    return settings.strategy.loss(model, base, trainable, images, noise, settings.mask_ratio)

  loss, grads = jax.value_and_grad(loss_fn)(state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  new_state = {
    "params": optax.apply_updates(state["params"], updates),
    "opt_state": opt_state,
    "step": state["step"] + 1,
  }
  # Parameters and optimiser state stay whole on every device (data parallelism).
  whole = parallel.replicated(mesh)
  return jax.lax.with_sharding_constraint((new_state, loss), whole)


def make_train_step(
  model: MaskedAutoencoder, optimizer: optax.GradientTransformation, mesh, settings: StepSettings
) -> Callable:
  """One compiled, data-parallel update: `step(state, base, shots, key) -> (state, loss)`.

  `state` (`training.init_state` of the trained tree) is donated; `base`, the normalised
  `shots` (k, H, W, 3) and the run's `key` should be placed on the mesh with
  `parallel.replicate`. The step's key is `fold_in(key, state['step'])`; the batch is
  built on device (`training_batch`) and split over `mesh`; the compiler averages the
  gradients over the whole batch.

  Steps for the same model, optimiser (`make_optimizer` returns the same object for the
  same settings), mesh and step settings share one compilation.
  """
  return functools.partial(
    _train_step, model=model, optimizer=optimizer, mesh=mesh, settings=settings
  )


def lower_train_step(
  model: MaskedAutoencoder,
  optimizer: optax.GradientTransformation,
  mesh,
  settings: StepSettings,
  *inputs,
) -> jax.stages.Lowered:
  """`make_train_step`, traced and lowered for `inputs` = (state, base, shots, key).

  `.compile()` gives the step compiled ahead of time, called like the step with arguments
  of the same shapes and shardings; lowering and compiling apart lets callers (`adapt`,
  benchmarks) time them apart from the steps.
  """
  return _train_step.lower(*inputs, model=model, optimizer=optimizer, mesh=mesh, settings=settings)
